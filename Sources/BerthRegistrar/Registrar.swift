import BerthEtcd
import Logging
import NIOCore
import Synchronization

/// How one registrar runs. `docker == nil` registers only `statics` and `fileStatics`.
public struct RegistrarConfiguration: Sendable {
    public var layout: RecordLayout
    /// `--host-ip`: the address registered for ports published on every address.
    public var hostIP: String?
    /// Lease TTL in seconds (`--ttl`); the lease is kept alive every TTL/3.
    public var ttlSeconds: Int64
    /// `--resync`: how often the container table is rebuilt from Docker and etcd read back.
    public var resyncInterval: Duration
    /// `--static`: fixed for the life of the process.
    public var statics: [Registration]
    /// `--static-file`: its path (nil: none), and the entries read from it at start-up, which
    /// `Registrar.reloadStaticFile()` replaces.
    public var staticFile: String?
    public var fileStatics: [Registration] = []
    public var docker: DockerClient?
    /// Event-stream reconnects: jittered, doubling from `initial` to `maximum`.
    public var reconnectInitial: Duration = .milliseconds(100)
    public var reconnectMaximum: Duration = .seconds(5)
    /// A lease handed over by the process this one took over (`--takeover-socket`): kept alive
    /// and written under instead of granting a new one (a new one is granted if it is gone).
    public var adoptedLease: Int64?

    public init(layout: RecordLayout = RecordLayout(), hostIP: String? = nil, ttlSeconds: Int64 = 15,
                resyncInterval: Duration = .seconds(30), statics: [Registration] = [], docker: DockerClient? = nil) {
        self.layout = layout
        self.hostIP = hostIP
        self.ttlSeconds = ttlSeconds
        self.resyncInterval = resyncInterval
        self.statics = statics
        self.docker = docker
    }

    /// Keep-alives go every TTL/3, as etcd's own client sends them: a lease lost to an etcd
    /// that lost its data is noticed (and every key put back) within TTL/3. It was at least once
    /// a second: in a fleet that is a keep-alive a second per host at etcd (200 a second for 200
    /// hosts, each a stream of its own), five times TTL/3's at the default TTL of 15 s.
    var leaseCheckInterval: Duration { .milliseconds(ttlSeconds * 1000 / 3) }
}

/// What the stats page shows of the registrar.
public struct RegistrarStatus: Sendable, Equatable {
    /// Keys this host holds in etcd under its lease.
    public var registered = 0
    /// Running containers known (registered or not).
    public var containers = 0
    public var leaseID: Int64?
    public var etcdReachable = false
    public var dockerEnabled = false
    public var dockerConnected = false
    /// Event lines acted on / skipped (unknown, garbage, overlong).
    public var eventsSeen = 0
    public var eventsSkipped = 0
    public var dockerReconnects = 0
    public var resyncs = 0
    /// `--static-file` reloads (SIGHUP) applied, and refused because the file could not be read
    /// or had a bad line (the previous entries were kept).
    public var staticReloads = 0
    public var staticReloadsFailed = 0
    /// Commands dropped because the queue (`Registrar.commandBacklog`) was full; each one makes
    /// the next command a full resync.
    public var commandsDropped = 0
}

/// State read by several tasks: the lease id (for the keeper) and the status figures.
final class RegistrarShared: Sendable {
    private let state = Mutex(RegistrarStatus())

    func update(_ change: (inout RegistrarStatus) -> Void) { state.withLock { change(&$0) } }
    var status: RegistrarStatus { state.withLock { $0 } }
    var lease: Int64? { state.withLock { $0.leaseID } }
    func setLease(_ lease: Int64?) { state.withLock { $0.leaseID = lease } }
}

/// Registration of this host's containers and static services into etcd under one lease.
/// A service object: `run()` until `shutdown()`, which revokes the lease.
///
/// Tasks inside `run()`:
/// - the processing loop (`RegistrationLoop`), the only writer of registration state and etcd;
/// - the Docker event follower: reconnects with jittered capped backoff; every (re)connect is
///   followed by a resync, so events lost while disconnected are repaired;
/// - the lease keeper: keep-alive every `leaseCheckInterval` (250 ms while etcd fails); reports
///   a lost lease to the loop;
/// - the resync ticker (`resyncInterval`).
/// They talk to the loop through one bounded queue of commands, and so does
/// `reloadStaticFile()` (SIGHUP), called from outside.
public final class Registrar: Sendable {
    enum Command: Sendable {
        case dockerConnected
        case dockerEvent(DockerEvent)
        case resync
        case leaseLost(Int64)
        case tick
        /// `reloadStaticFile()` left new `--static-file` entries in `pendingStatics`.
        case statics
        case shutdown
    }

    /// Bound of the command queue. Past it commands are dropped and counted, and the loop
    /// resyncs (a resync subsumes any event).
    public static let commandBacklog = 4096
    /// Unknown/garbage lines are logged for the first this many, then every 100th.
    static let skippedLinesLogged = 20

    public let configuration: RegistrarConfiguration
    private let store: any RegistrationStore
    private let logger: Logger
    private let shared = RegistrarShared()
    private let commands: AsyncStream<Command>
    private let continuation: AsyncStream<Command>.Continuation
    private let stopRequested = Atomic<Bool>(false)
    private let revokeOnStop = Atomic<Bool>(true)
    private let started = Atomic<Bool>(false)
    private let dropped = Atomic<Int>(0)
    /// The latest `--static-file` entries read and not yet applied. Kept here rather than in the
    /// command, so that a `.statics` dropped from a full queue is applied all the same (after
    /// the next command), and two reloads in a row apply the newer one.
    private let pendingStatics = Mutex<[Registration]?>(nil)

    public init(configuration: RegistrarConfiguration, store: any RegistrationStore, logger: Logger = Logger(label: "berth.registrar")) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        let stream = AsyncStream.makeStream(of: Command.self, bufferingPolicy: .bufferingOldest(Self.commandBacklog))
        commands = stream.stream
        continuation = stream.continuation
        shared.update { $0.dockerEnabled = configuration.docker != nil }
    }

    public var status: RegistrarStatus { shared.status }

    /// Runs until `shutdown()`; then revokes the lease and returns. Call once.
    public func run() async throws {
        guard !started.exchange(true, ordering: .relaxed) else { throw RegistrarAlreadyRunning() }
        await withTaskGroup(of: Void.self) { group in
            if let docker = configuration.docker {
                group.addTask { await self.followEvents(docker) }
            }
            group.addTask { await self.keepLeaseAlive() }
            group.addTask { await self.tickResync() }
            await self.process()
            group.cancelAll()
        }
        continuation.finish()
    }

    /// Asks `run()` to revoke the lease and return. Safe from any thread, more than once.
    /// `revokingLease: false` (a successor took the lease over): the lease and its keys stay.
    public func shutdown(revokingLease: Bool = true) {
        if !revokingLease { revokeOnStop.store(false, ordering: .relaxed) }
        stopRequested.store(true, ordering: .relaxed)
        continuation.yield(.shutdown)
    }

    /// SIGHUP: reads `configuration.staticFile` again (nothing happens without one). Valid: its
    /// entries replace the file's previous ones through the command queue, so the loop writes
    /// only the difference under its lease, and logs `static services reloaded from PATH: N
    /// entries (+A, -D)` (A new or changed, D removed). Unreadable or invalid: logged with the line
    /// and the reason, counted (`staticReloadsFailed`), and the previous entries stay.
    /// Reads the file here, blocking: call it from a thread of its own (the signal thread).
    public func reloadStaticFile() {
        guard let path = configuration.staticFile else { return }
        do {
            let entries = try StaticServiceFile.load(path: path, flags: configuration.statics)
            pendingStatics.withLock { $0 = entries }
            post(.statics)
        } catch {
            shared.update { $0.staticReloadsFailed += 1 }
            logger.error("static services not reloaded from \(path): \(error.detail); the previous entries stay registered")
        }
    }

    private func post(_ command: Command) {
        if case .dropped(_) = continuation.yield(command) {
            dropped.add(1, ordering: .relaxed)
            shared.update { $0.commandsDropped += 1 }
        }
    }

    // MARK: - The processing loop

    private func process() async {
        let loop = RegistrationLoop(configuration: configuration, store: store, logger: logger, shared: shared)
        var droppedSeen = 0
        // The lease and the static services first; containers follow once Docker answers.
        await loop.sync()
        for await command in commands {
            if stopRequested.load(ordering: .relaxed) { break }
            switch command {
            case .dockerConnected, .resync:
                await loop.resync(docker: configuration.docker)
            case .dockerEvent(let event):
                if let docker = configuration.docker { await loop.handle(event, docker: docker) }
            case .leaseLost(let lease):
                await loop.leaseLost(lease)
            case .statics:
                await applyPendingStatics(loop)
            case .tick:
                if loop.resyncPending {
                    await loop.resync(docker: configuration.docker)
                } else if loop.dirty {
                    await loop.sync()
                }
            case .shutdown:
                break
            }
            let droppedNow = dropped.load(ordering: .relaxed)
            if droppedNow != droppedSeen {
                droppedSeen = droppedNow
                await applyPendingStatics(loop)
                await loop.resync(docker: configuration.docker)
            }
            if stopRequested.load(ordering: .relaxed) { break }
        }
        if revokeOnStop.load(ordering: .relaxed) {
            await loop.revoke()
        } else {
            loop.handOver()
        }
    }

    private func applyPendingStatics(_ loop: RegistrationLoop) async {
        guard let path = configuration.staticFile, let entries = pendingStatics.withLock({ $0.take() }) else { return }
        let (added, removed) = await loop.replaceFileStatics(entries)
        shared.update { $0.staticReloads += 1 }
        logger.info("static services reloaded from \(path): \(entries.count) entries (+\(added), -\(removed))")
    }

    // MARK: - Docker events

    private func followEvents(_ docker: DockerClient) async {
        var backoff = Backoff(Backoff.Settings(initial: configuration.reconnectInitial, maximum: configuration.reconnectMaximum))
        var lastError: String?
        while !Task.isCancelled {
            var splitter = LineSplitter()
            do {
                try await docker.followEvents(opened: {
                    backoff.reset()
                    lastError = nil
                    shared.update { $0.dockerConnected = true }
                    logger.info("following Docker events on \(docker.socketPath)")
                    post(.dockerConnected)
                }, received: { buffer in
                    for piece in splitter.append(buffer.readableBytesView) { self.take(piece) }
                })
                if !Task.isCancelled { logger.warning("Docker closed the event stream; reconnecting") }
            } catch {
                let text = "\(error)"
                if text != lastError && !Task.isCancelled { logger.warning("Docker events: \(text); reconnecting") }
                lastError = text
            }
            shared.update {
                if $0.dockerConnected { $0.dockerReconnects += 1 }
                $0.dockerConnected = false
            }
            try? await backoff.wait()
        }
    }

    private func take(_ piece: LineSplitter.Piece) {
        let line: EventLine
        switch piece {
        case .line(let bytes): line = DockerEventParser.parse(bytes)
        case .overlong: line = .garbage("line longer than the bound")
        }
        switch line {
        case .event(let event):
            shared.update { $0.eventsSeen += 1 }
            post(.dockerEvent(event))
        case .unknown(let reason), .garbage(let reason):
            var count = 0
            shared.update {
                $0.eventsSkipped += 1
                count = $0.eventsSkipped
            }
            if count <= Self.skippedLinesLogged || count % 100 == 0 {
                var sample = ""
                if case .line(let bytes) = piece { sample = String(decoding: bytes.prefix(120), as: UTF8.self) }
                logger.warning("Docker event line skipped (\(reason), \(count) so far): \(sample)")
            }
        }
    }

    // MARK: - Timers

    private func keepLeaseAlive() async {
        var failing = false
        while !Task.isCancelled {
            try? await Task.sleep(for: failing ? .milliseconds(250) : configuration.leaseCheckInterval)
            if let lease = shared.lease {
                do {
                    let remaining = try await withDeadline(RegistrationLoop.storeTimeout, what: "keep-alive") { [store] in
                        try await store.keepAliveOnce(lease: lease)
                    }
                    if failing { logger.info("etcd answers keep-alives again") }
                    failing = false
                    if remaining <= 0 { post(.leaseLost(lease)) }
                } catch {
                    if !failing && !Task.isCancelled { logger.warning("lease keep-alive failed: \(error)") }
                    failing = true
                }
            }
            post(.tick)
        }
    }

    private func tickResync() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: configuration.resyncInterval)
            if !Task.isCancelled { post(.resync) }
        }
    }
}

public struct RegistrarAlreadyRunning: Error, CustomStringConvertible {
    public var description: String { "Registrar.run() was called twice" }
}
