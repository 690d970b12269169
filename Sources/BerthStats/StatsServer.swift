import BerthEngine
import BerthSystem
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// Where and how the stats server listens, and its bounds.
public struct StatsServerConfiguration: Sendable {
    public var listen: BerthSystem.SocketAddress
    /// Basic-auth credentials: required by every page but `/healthz`, and what enables the
    /// admin API. nil: pages open, admin off.
    public var credentials: StatsCredentials?
    public var version: String
    /// Connections open at once; past it, new ones are closed at once.
    public var maxConnections = 256
    /// Milliseconds a connection may take to send a complete request (from its opening, or from
    /// the previous response): slowloris clients and idle keep-alive connections are closed.
    public var requestTimeout: Int64 = 5_000
    /// Milliseconds a client may take to read a response.
    public var writeTimeout: Int64 = 10_000
    /// Request line plus headers; beyond: 431 and close.
    public var maxHeaderBytes = 8 * 1024
    /// Request body (the admin API takes none); beyond: 413 and close.
    public var maxBodyBytes = 4 * 1024

    public init(listen: BerthSystem.SocketAddress, credentials: StatsCredentials? = nil, version: String) {
        self.listen = listen
        self.credentials = credentials
        self.version = version
    }
}

/// The stats and admin HTTP server (`--stats`, default 0.0.0.0:1936), on SwiftNIO with an event
/// loop group of its own (one thread): never on a data-plane worker, and whatever its clients
/// do, the data plane only sees `Engine.statistics()` reads (a per-worker lock the workers take
/// only when installing a table).
///
/// Threads: `start` and `stop` from any thread but the server's own loop.
public final class StatsServer: Sendable {
    /// The stats thread's nice value (the workers keep the process's, normally 0): under CPU
    /// contention the scheduler gives it about a tenth of a worker's share.
    public static let threadNice = 10
    public let configuration: StatsServerConfiguration
    private let group: MultiThreadedEventLoopGroup
    private let collector: NIOLoopBound<StatsCollector>
    private let state = Mutex<(channel: Channel?, sampler: RepeatedTask?)>((nil, nil))
    private let connections = ConnectionCounts()
    private let logger: Logger

    public init(configuration: StatsServerConfiguration, provider: StatsProvider,
                logger: Logger = Logger(label: "berth.stats")) {
        self.configuration = configuration
        self.logger = logger
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let adminEnabled = configuration.credentials != nil && provider.setAdminState != nil
        let version = configuration.version
        // The collector lives on the loop: it is made there and only touched there. The loop's
        // thread runs nicer than the workers, so that a flood of requests to the stats port
        // takes CPU only where the data plane leaves it (bench --scenarios stats-fuzz).
        collector = try! loop.submit {
            if !setCurrentThreadNice(Self.threadNice) {
                logger.debug("cannot set the stats thread's nice value", metadata: ["nice": "\(Self.threadNice)"])
            }
            return NIOLoopBound(StatsCollector(provider: provider, version: version, adminEnabled: adminEnabled), eventLoop: loop)
        }.wait()
    }

    /// Binds and starts serving; returns the address bound (port 0 resolved).
    @discardableResult
    public func start() throws -> BerthSystem.SocketAddress {
        let loop = group.next()
        let limits = configuration
        let collector = collector
        let connections = connections
        let decoderLimits = {
            var decoderLimits = NIOHTTPDecoderLimitConfiguration()
            decoderLimits.maxHeaderListSize = limits.maxHeaderBytes
            decoderLimits.maxHeaderFieldSize = limits.maxHeaderBytes
            decoderLimits.maxHeaderFieldCount = 100
            return decoderLimits
        }()
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.maxMessagesPerRead, value: 16)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.maxMessagesPerRead, value: 1)
            // A client that half-closes after its requests still gets its answers.
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                // The cap counts connections from accept to close.
                if connections.open.add(1, ordering: .relaxed).newValue > limits.maxConnections {
                    connections.open.subtract(1, ordering: .relaxed)
                    connections.refused.add(1, ordering: .relaxed)
                    return channel.close()
                }
                channel.closeFuture.whenComplete { _ in connections.open.subtract(1, ordering: .relaxed) }
                do {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                        withPipeliningAssistance: true, withErrorHandling: false,
                        withEncoderConfiguration: .init(), withDecoderLimitConfiguration: decoderLimits)
                    let responder = StatsResponder(collector: collector.value, credentials: limits.credentials)
                    try channel.pipeline.syncOperations.addHandler(StatsHTTPHandler(responder: responder, limits: limits))
                    return channel.eventLoop.makeSucceededVoidFuture()
                } catch {
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        let channel = try bootstrap.bind(host: configuration.listen.host, port: Int(configuration.listen.port)).wait()
        // Session rates: one sample of the counters a second.
        let sampler = loop.scheduleRepeatedTask(initialDelay: .zero, delay: .seconds(1)) { _ in
            collector.value.sample()
        }
        state.withLock { $0 = (channel, sampler) }
        guard let port = channel.localAddress?.port else { return configuration.listen }
        return configuration.listen.withPort(UInt16(port))
    }

    /// Where the server listens once started (the port chosen, for port 0).
    public var boundAddress: BerthSystem.SocketAddress? {
        guard let port = state.withLock({ $0.channel })?.localAddress?.port else { return nil }
        return configuration.listen.withPort(UInt16(port))
    }

    /// Connections open now, and those refused by the cap since start.
    public var connectionCounts: (open: Int, refused: UInt64) {
        (connections.open.load(ordering: .relaxed), connections.refused.load(ordering: .relaxed))
    }

    /// Stops listening, closes every connection, ends the loop thread. Safe to call twice.
    public func stop() {
        let (channel, sampler) = state.withLock { current in
            let taken = current
            current = (nil, nil)
            return taken
        }
        sampler?.cancel()
        if let channel { try? channel.close().wait() }
        do {
            try group.syncShutdownGracefully()
        } catch {
            logger.debug("stats event loop shutdown: \(error)")
        }
    }
}

/// Connections open now and refused by the cap (shared by the accept path and readers).
private final class ConnectionCounts: Sendable {
    let open = Atomic<Int>(0)
    let refused = Atomic<UInt64>(0)
}
