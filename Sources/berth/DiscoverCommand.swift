import ArgumentParser
import BerthDiscovery
import BerthEngine
import BerthRegistry
import BerthSystem
import BerthEtcd
import BerthHealth
import BerthRegistrar
import BerthStats
import Dispatch
import Glibc
import Synchronization

/// `berth discover`: watch the registry in etcd and proxy every service found there.
struct DiscoverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "discover",
        abstract: "Watch the registry in etcd and balance every service it lists.",
        discussion: """
            Lists the keys under --prefix, then watches them (no polling). Each service gets a \
            listener on --bind at its listen port, balancing new connections round-robin over its \
            instances; changes apply live, without dropping open connections. Key layouts read: \
            Berth's JSON values, the seed's HOST:PORT values with a <service>/port key, and \
            registrator's HOST:PORT values (listen port from <prefix>/_config/<service> or \
            --default-listen); see docs/REGISTRY.md. While etcd is unreachable, the last known \
            table keeps serving.
            """)

    static let environment = EnvironmentFlags(
        command: "discover",
        flags: EtcdOptions.environment + DiscoveryOptions.environment + ProxyOptions.environment + HealthOptions.environment
            + StatsOptions.environment + LoggingOptions.environment + TakeoverOptions.environment,
        switches: ProxyOptions.switches)

    @OptionGroup(title: "etcd")
    var etcd: EtcdOptions

    @OptionGroup(title: "Discovery")
    var discovery: DiscoveryOptions

    @OptionGroup(title: "Proxying")
    var proxy: ProxyOptions

    @OptionGroup(title: "Health checks")
    var health: HealthOptions

    @OptionGroup(title: "Stats and admin")
    var stats: StatsOptions

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    @OptionGroup(title: "Restarts")
    var takeover: TakeoverOptions

    func run() throws {
        ProcessSignals.block([SIGTERM, SIGINT])
        let incoming = takeover.request()
        if let lease = incoming?.offer.leaseID {
            log("takeover: lease \(lease) is not adopted by discover (only run registers); the previous process keeps it until it exits")
        }
        let running = try DiscoveryRuntime.start(etcd: etcd, discovery: discovery, proxy: proxy, health: health,
                                                 prepare: { takeover.adopt(incoming, into: $0.engine) })
        takeover.complete(incoming, engine: running.router.engine, ready: { running.router.engine.statistics().revision > 0 })
        let server = try running.startStats(stats, reusePort: takeover.enabled)
        let taken = TakenOver()
        let takeoverServer = try running.serveTakeover(takeover, taken: taken)
        proxy.waitForSignalThenDrain(running.router, taken: taken, beforeDrain: {
            takeoverServer?.stop()
            running.stop()
        }, afterDrain: { server?.stop() })
    }
}

/// The discovery flags shared by `discover`, `run` and `dev`.
struct DiscoveryOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [
        ("--bind", "BERTH_BIND"), ("--default-listen", "BERTH_DEFAULT_LISTEN"), ("--linger", "BERTH_LINGER"),
        ("--state-file", "BERTH_STATE_FILE"), ("--relist-jitter", "BERTH_RELIST_JITTER"), ("--services", "BERTH_SERVICES"),
    ]

    @Option(help: EnvironmentFlags.help("Address every service listens on (its port comes from the registry).", "BERTH_BIND"))
    var bind: String = "0.0.0.0"

    @Option(help: EnvironmentFlags.help("Listen port of services that name none (registrator's layout with no _config).", "BERTH_DEFAULT_LISTEN"))
    var defaultListen: UInt16?

    @Option(help: EnvironmentFlags.help("How long the listener of a service with no instance left stays open.", "BERTH_LINGER"), transform: DurationArgument.parse)
    var linger = DurationArgument(milliseconds: 30_000)

    @Option(help: EnvironmentFlags.help("File that keeps the last routing table applied (written atomically, at most once a second); served from at start while etcd is unreachable.", "BERTH_STATE_FILE"))
    var stateFile: String?

    @Option(help: EnvironmentFlags.help("When the watch fell behind an etcd compaction, wait a random time up to this long before listing the registry again, so that hosts cut off together do not all list at once (0: at once).", "BERTH_RELIST_JITTER"), transform: DurationArgument.parse)
    var relistJitter = DurationArgument(milliseconds: 1_000)

    @Option(help: EnvironmentFlags.help("Serve only these services (comma-separated names): discovery lists and watches only their keys and their _config, so etcd sends this host nothing about the others (default: every service).", "BERTH_SERVICES"))
    var services: String?

    /// Appends "REVISION MONOTONIC-NS" for every table applied (`bench --scenarios fleet`).
    @Option(help: .hidden)
    var revisionLog: String?

    func validate() throws {
        _ = try bindAddress()
        if defaultListen == 0 { throw invalid("--default-listen", "0", "a port from 1 to 65535") }
        if stateFile?.isEmpty == true { throw invalid("--state-file", "", "a file path") }
        _ = try serviceFilter()
    }

    /// `--services` as a set of names (nil: every service).
    func serviceFilter() throws -> Set<String>? {
        guard let services else { return nil }
        let names = services.split(separator: ",", omittingEmptySubsequences: false)
            .map { String($0.drop { $0 == " " }.reversed().drop { $0 == " " }.reversed()) }
        guard !names.isEmpty, names.allSatisfy({ !$0.isEmpty && !$0.contains("/") }) else {
            throw invalid("--services", services, "service names separated by commas (none empty, no '/')")
        }
        return Set(names)
    }

    func bindAddress() throws -> SocketAddress {
        do {
            return try SocketAddress(host: bind.hasPrefix("[") ? String(bind.dropFirst().dropLast()) : bind, port: 0)
        } catch {
            throw ValidationError("--bind: \(error)")
        }
    }
}

/// `--revision-log PATH`: one line per revision the routing came to reflect (each applied table,
/// and each watch batch that changed nothing routable), the revision and the monotonic clock in
/// ns (comparable across processes on one host), one append each. For the fleet benchmark.
final class RevisionLog: Sendable {
    private let fd: CInt

    init(path: String) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("--revision-log \(path): cannot open (errno \(errno))") }
    }

    @Sendable func record(_ revision: Int64) {
        var line = Array("\(revision) \(MonotonicClock.nanoseconds())\n".utf8)
        _ = line.withUnsafeMutableBytes { write(fd, $0.baseAddress, $0.count) }
    }

    deinit { close(fd) }
}

/// Discovery and the proxy, started; `stop()` ends the watch (the caller drains the router).
struct DiscoveryRuntime {
    let client: EtcdClient
    let router: HealthRouter
    let service: DiscoveryService
    let task: Task<Void, Never>
    /// With `--state-file`: the writer, and whether the first table came from the file.
    let stateFile: StateFileSession?

    /// Connects to etcd (an authentication failure is fatal at once; an unreachable etcd is
    /// not: the watch keeps retrying), opens the proxy, and starts the watch.
    /// `prepare` runs once the router exists, before the watch can apply a table (a takeover's
    /// sockets are adopted there).
    static func start(etcd: EtcdOptions, discovery: DiscoveryOptions, proxy: ProxyOptions, health: HealthOptions,
                      prepare: (HealthRouter) -> Void = { _ in }) throws -> DiscoveryRuntime {
        // Opened before anything else: a bad path fails with nothing yet to close.
        let revisionLog = try discovery.revisionLog.map { path in try RevisionLog(path: path) }
        // Validated before anything is opened: a bad value fails with nothing to close.
        let catalog = Catalog.Options(layout: RegistryLayout(prefix: etcd.prefix), defaultListen: discovery.defaultListen,
                                      linger: discovery.linger.milliseconds, services: try discovery.serviceFilter())
        let bind = try discovery.bindAddress()
        let client = try EtcdClient(configuration: etcd.configuration())
        var etcdAnswered = true
        do {
            // A key inside what the watch reads: an etcd user granted just the registry's prefix
            // (or its services' prefixes) may read nothing else.
            let probe = catalog.watchRanges[0]
            _ = try blockingAwait { try await client.get(key: probe) }
        } catch let error as EtcdError {
            if case .authenticationFailed = error {
                client.close()
                throw error
            }
            etcdAnswered = false
            log("warning: \(error); \(discovery.stateFile == nil ? "serving nothing" : "trying the state file") until etcd answers")
        }
        let configuration = proxy.engineConfiguration(observeErrors: health.observeErrors, logAvailable: true)
        let router: HealthRouter
        do {
            router = try HealthRouter.make(configuration: configuration, policy: health.policy, alwaysCheck: true)
        } catch {
            client.close()
            throw error
        }
        prepare(router)
        let stateFile = discovery.stateFile.map { StateFileSession.start(path: $0, router: router, restore: !etcdAnswered) }
        var settings = DiscoverySettings(
            catalog: catalog,
            bind: bind, defaults: proxy.frontendSettings, checkDefaults: health.policy.checks)
        settings.listenRetryInterval = .seconds(5)
        settings.relistJitter = discovery.relistJitter.milliseconds
        if let revisionLog { settings.onApplied = revisionLog.record }
        let service = DiscoveryService(client: client, router: router, settings: settings)
        let task = Task {
            do {
                try await service.run()
            } catch is CancellationError {
            } catch {
                log("discovery stopped: \(error)")
                kill(getpid(), SIGTERM)
            }
        }
        stateFile?.announceTakeover(by: service)
        log("watching \(etcd.prefix)/ on \(etcd.etcd); services listen on \(discovery.bind); \(proxy.summary(configuration)), checks \(health.summary)")
        return DiscoveryRuntime(client: client, router: router, service: service, task: task, stateFile: stateFile)
    }

    func stop() {
        task.cancel()
        client.close()
        stateFile?.stop()
    }

    /// Starts the stats server (unless `--stats off`) over the router, discovery and, when
    /// given, the registrar. A failure to start stops what `start` started.
    func startStats(_ options: StatsOptions, registrar: Registrar? = nil, reusePort: Bool = false) throws -> StatsServer? {
        let service = self.service
        let stateFile = self.stateFile
        let discoveryView: @Sendable () -> DiscoveryView = {
            let status = service.status
            var view = DiscoveryView(endpoint: status.endpoint, connected: status.connected, appliedRevision: status.appliedRevision,
                                     secondsSinceLastEvent: status.secondsSinceLastEvent, skippedValues: status.skippedValues)
            stateFile?.describe(into: &view, listings: status.listings)
            return view
        }
        var registrarView: (@Sendable () -> RegistrarView)?
        if let registrar {
            let ttl = Int(registrar.configuration.ttlSeconds)
            registrarView = {
                let status = registrar.status
                return RegistrarView(registeredContainers: status.registered, leaseID: status.leaseID,
                                     leaseTTLSeconds: ttl, dockerConnected: status.dockerConnected)
            }
        }
        do {
            return try options.start(provider: .router(router, discovery: discoveryView, registrar: registrarView), reusePort: reusePort)
        } catch {
            stop()
            router.shutdown(drainTimeout: 0)
            throw error
        }
    }
}

extension DiscoveryRuntime {
    /// Listens on the takeover socket (when set); a failure stops what `start` started.
    func serveTakeover(_ options: TakeoverOptions, taken: TakenOver, leaseID: @escaping @Sendable () -> Int64? = { nil }) throws -> TakeoverServer? {
        do {
            return try options.serve(engine: router.engine, taken: taken, leaseID: leaseID)
        } catch {
            stop()
            router.shutdown(drainTimeout: 0)
            throw error
        }
    }
}

/// Runs async work from synchronous command code (the main thread, never a worker) and waits.
func blockingAwait<Value: Sendable>(_ body: @escaping @Sendable () async throws -> Value) throws -> Value {
    let outcome = Mutex<Result<Value, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task {
        let result: Result<Value, any Error>
        do { result = .success(try await body()) } catch { result = .failure(error) }
        outcome.withLock { $0 = result }
        done.signal()
    }
    done.wait()
    return try outcome.withLock { $0! }.get()
}
