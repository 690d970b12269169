import BerthEngine
import BerthSystem
import Glibc
import Logging
import Synchronization

/// Where and how the stats server listens, and its bounds.
public struct StatsServerConfiguration: Sendable {
    public var listen: SocketAddress
    /// Basic-auth credentials: required by every page but `/healthz`, and what enables the
    /// admin API. nil: pages open, admin off.
    public var credentials: StatsCredentials?
    public var version: String
    /// Connections open at once; past it, new ones are closed at once.
    public var maxConnections = 256
    /// Bind with SO_REUSEPORT, so that a process taking over (`--takeover-socket`) can listen
    /// on the same address while the one it replaces still runs.
    public var reusePort = false
    /// Milliseconds a connection may take to send a complete request (from its opening, or from
    /// the previous response): slowloris clients and idle keep-alive connections are closed.
    public var requestTimeout: Int64 = 5_000
    /// Milliseconds a client may take to read a response.
    public var writeTimeout: Int64 = 10_000
    /// Request line plus headers; beyond: 431 and close.
    public var maxHeaderBytes = 8 * 1024
    /// Request body (the admin API takes none); beyond: 413 and close.
    public var maxBodyBytes = 4 * 1024

    public init(listen: SocketAddress, credentials: StatsCredentials? = nil, version: String) {
        self.listen = listen
        self.credentials = credentials
        self.version = version
    }
}

/// The stats and admin HTTP server (`--stats`, default 0.0.0.0:1936): one thread of its own,
/// an epoll loop on BerthSystem's `EventLoopCore` (`StatsLoop`), never a data-plane worker.
/// Whatever its clients do, the data plane only sees `Engine.statistics()` reads (a per-worker
/// lock the workers take only when installing a table).
///
/// Threads: `start` and `stop` from any thread but the server's own.
public final class StatsServer: Sendable {
    /// The stats thread's nice value (the workers keep the process's, normally 0): under CPU
    /// contention the scheduler gives it about a tenth of a worker's share.
    public static let threadNice = 10
    /// The stats thread's name (tests and the bench find it by it).
    public static let threadName = "berth-stats"
    public let configuration: StatsServerConfiguration
    private let provider: StatsProvider
    private let state = Mutex<(wakeup: WakeupSignal?, thread: pthread_t?, address: SocketAddress?)>((nil, nil, nil))
    let counts = StatsConnectionCounts()
    private let logger: Logger

    public init(configuration: StatsServerConfiguration, provider: StatsProvider,
                logger: Logger = Logger(label: "berth.stats")) {
        self.configuration = configuration
        self.provider = provider
        self.logger = logger
    }

    /// Binds and starts serving; returns the address bound (port 0 resolved).
    @discardableResult
    public func start() throws -> SocketAddress {
        var listener = try Sockets.listen(on: configuration.listen, reusePort: configuration.reusePort, backlog: 256)
        let address: SocketAddress
        do {
            address = try Sockets.localAddress(listener.raw)
        } catch {
            listener.close()
            throw error
        }
        let adminEnabled = configuration.credentials != nil && provider.setAdminState != nil
        let collector = StatsCollector(provider: provider, version: configuration.version, adminEnabled: adminEnabled)
        let loop = try StatsLoop(listener: listener.release(), configuration: configuration,
                                 responder: StatsResponder(collector: collector, credentials: configuration.credentials),
                                 counts: counts)
        let logger = logger
        let wakeup = loop.wakeup
        let thread = OSThread(name: Self.threadName) {
            if !setCurrentThreadNice(Self.threadNice) {
                logger.debug("cannot set the stats thread's nice value", metadata: ["nice": "\(Self.threadNice)"])
            }
            loop.run()
        }
        state.withLock { $0 = (wakeup, thread.handle, address) }
        return address
    }

    /// Where the server listens once started (the port chosen, for port 0).
    public var boundAddress: SocketAddress? { state.withLock { $0.address } }

    /// Connections open now, and those refused by the cap since start.
    public var connectionCounts: (open: Int, refused: UInt64) {
        (counts.open.load(ordering: .relaxed), counts.refused.load(ordering: .relaxed))
    }

    /// Stops listening, closes every connection, ends the thread. Safe to call twice.
    public func stop() {
        let (wakeup, thread, _) = state.withLock { current in
            let taken = current
            current = (nil, nil, current.address)
            return taken
        }
        wakeup?.wake()
        if let thread { pthread_join(thread, nil) }
    }
}

/// Connections open now and refused by the cap (written by the loop, read by anyone).
final class StatsConnectionCounts: Sendable {
    let open = Atomic<Int>(0)
    let refused = Atomic<UInt64>(0)
}
