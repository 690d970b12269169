import BerthEngine
import BerthSystem
import BerthHealth
import Glibc

/// Where the stats server reads what it shows and sends what an operator asks: closures the
/// `berth` command wires. Each is called on the stats server's event-loop thread, so each must
/// return quickly (take a lock briefly at most; never block on the network).
public struct StatsProvider: Sendable {
    /// The data plane's counters, summed over workers (`Engine.statistics()`).
    public var engine: @Sendable () -> EngineStatistics
    /// The desired table: services, their backends in order, their addresses.
    public var table: @Sendable () -> RoutingTable
    /// Where each service listens now (port 0 resolved); missing ones show the table's address.
    public var listening: @Sendable () -> [String: SocketAddress] = { [:] }
    /// Health of every checked backend (empty without checks).
    public var health: @Sendable () -> [BackendKey: BackendHealth]
    /// Operator overrides in force.
    public var adminStates: @Sendable () -> [BackendKey: AdminState]
    /// Times each service had every backend down.
    public var allDownEvents: @Sendable () -> [String: UInt64]
    /// Active check settings (nil: no active checks).
    public var checks: CheckSettings?
    public var workers: Int
    public var openConnections: @Sendable () -> Int
    /// Applies an operator override; nil disables the admin API whatever the credentials.
    public var setAdminState: (@Sendable (AdminState, BackendKey) throws(AdminError) -> Void)?
    /// Discovery's state; nil in processes without discovery. Filled by `discover`/`run`/`dev`.
    public var discovery: (@Sendable () -> DiscoveryView)?
    /// The registrar's state; nil in processes that register nothing.
    public var registrar: (@Sendable () -> RegistrarView)?
    /// Balancing weights as published (operators' weights, slow start); nil: the table's.
    public var weights: (@Sendable () -> [BackendKey: WeightInForce])?
    /// Sets or clears (nil) an operator weight; nil disables that admin route.
    public var setWeight: (@Sendable (Int?, BackendKey) throws(AdminError) -> Void)?

    public init(engine: @escaping @Sendable () -> EngineStatistics,
                table: @escaping @Sendable () -> RoutingTable,
                health: @escaping @Sendable () -> [BackendKey: BackendHealth] = { [:] },
                adminStates: @escaping @Sendable () -> [BackendKey: AdminState] = { [:] },
                allDownEvents: @escaping @Sendable () -> [String: UInt64] = { [:] },
                checks: CheckSettings? = nil, workers: Int = 1,
                openConnections: @escaping @Sendable () -> Int = { 0 },
                setAdminState: (@Sendable (AdminState, BackendKey) throws(AdminError) -> Void)? = nil,
                discovery: (@Sendable () -> DiscoveryView)? = nil,
                registrar: (@Sendable () -> RegistrarView)? = nil) {
        self.engine = engine
        self.table = table
        self.health = health
        self.adminStates = adminStates
        self.allDownEvents = allDownEvents
        self.checks = checks
        self.workers = workers
        self.openConnections = openConnections
        self.setAdminState = setAdminState
        self.discovery = discovery
        self.registrar = registrar
    }

    /// Everything a `HealthRouter` (and the engine under it) knows; discovery and registrar
    /// views are added by the commands that run them.
    public static func router(_ router: HealthRouter,
                              discovery: (@Sendable () -> DiscoveryView)? = nil,
                              registrar: (@Sendable () -> RegistrarView)? = nil) -> StatsProvider {
        let engine = router.engine
        var provider = StatsProvider(
            engine: { engine.statistics() },
            table: { router.desiredTable() },
            health: { router.health() },
            adminStates: { router.adminStates() },
            allDownEvents: { router.allDownEvents() },
            checks: router.policy.checks,
            workers: engine.configuration.workers,
            openConnections: { engine.openConnections },
            setAdminState: { (state, key) throws(AdminError) in try router.setAdminState(state, for: key) },
            discovery: discovery, registrar: registrar)
        provider.listening = { engine.listeningAddresses() }
        provider.weights = { router.weights() }
        provider.setWeight = { (weight, key) throws(AdminError) in try router.setWeight(weight, for: key) }
        return provider
    }
}

/// Builds `StatsSnapshot`s from a provider. Keeps the session-rate samples, so one collector
/// serves one server. Threads: used on the stats event loop only (`sample` and `snapshot`).
final class StatsCollector {
    let provider: StatsProvider
    let version: String
    let adminEnabled: Bool
    private let started = MonotonicClock.milliseconds()
    private var rates = RateSampler()

    init(provider: StatsProvider, version: String, adminEnabled: Bool) {
        self.provider = provider
        self.version = version
        self.adminEnabled = adminEnabled
    }

    /// Called once a second: records session totals for the rate columns.
    func sample() {
        rates.record(provider.engine(), now: MonotonicClock.milliseconds())
    }

    func snapshot() -> StatsSnapshot {
        let now = MonotonicClock.milliseconds()
        let statistics = provider.engine()
        let health = provider.health()
        let admin = provider.adminStates()
        let allDown = provider.allDownEvents()
        var services: [ServiceStats] = []
        let listening = provider.listening()
        let weights = provider.weights?() ?? [:]
        for frontend in provider.table().frontends {
            let counters = statistics.frontends[frontend.name]
            var backends: [BackendStats] = []
            for backend in frontend.backends {
                let key = BackendKey(frontend: frontend.name, backend: backend.name)
                let adminState = admin[key] ?? .ready
                let record = health[key]
                let check = record.flatMap { CheckReport.stats($0, settings: provider.checks, now: now) }
                let inForce = weights[key]
                let warmup = inForce.map(\.warmup) ?? Backend.fullWarmup
                backends.append(BackendStats(
                    name: backend.name, address: backend.address.description,
                    status: Self.status(admin: adminState, health: record, enabled: backend.enabled),
                    adminState: adminState, weight: inForce?.weight ?? backend.weight,
                    operatorWeight: inForce?.overridden == true ? true : nil,
                    warmupPercent: warmup < Backend.fullWarmup ? warmup / 10 : nil, check: check,
                    traffic: traffic(counters?.backends[backend.name], rate: rates.rate(key), now: now)))
            }
            var totals = TrafficStats()
            for backend in backends { totals.add(backend.traffic) }
            services.append(ServiceStats(
                name: frontend.name, listen: (listening[frontend.name] ?? frontend.listen).description,
                frontend: traffic(counters?.traffic, rate: rates.rate(BackendKey(frontend: frontend.name, backend: "")), now: now),
                backends: backends, totals: totals,
                status: backends.contains { $0.status.takesTraffic } ? "UP" : "DOWN",
                allDownEvents: allDown[frontend.name] ?? 0))
        }
        var process = ProcessView(
            version: version, pid: getpid(), uptimeSeconds: Double(now - started) / 1000,
            workers: provider.workers, openConnections: provider.openConnections(),
            tableRevision: statistics.revision, adminEnabled: adminEnabled)
        process.connectionLogWritten = statistics.connectionLogWritten
        process.connectionLogDropped = statistics.connectionLogDropped
        return StatsSnapshot(process: process, discovery: provider.discovery?(),
                             registrar: provider.registrar?(), services: services)
    }

    /// Operator override first (HAProxy shows MAINT and DRAIN over the check's verdict, but a
    /// drained backend that is down shows DOWN), then health.
    static func status(admin: AdminState, health: BackendHealth?, enabled: Bool) -> BackendStatus {
        if admin == .maint || !enabled { return .maint }
        guard let health else { return admin == .drain ? .drain : .noCheck }
        if health.status == .down { return .down }
        return admin == .drain ? .drain : .up
    }

    private func traffic(_ snapshot: TrafficSnapshot?, rate: (current: Double, max: Double), now: Int64) -> TrafficStats {
        var traffic = TrafficStats()
        traffic.sessionRate = rate.current
        traffic.sessionRateMax = rate.max
        guard let snapshot else { return traffic }
        traffic.currentSessions = snapshot.currentSessions
        traffic.maxSessions = snapshot.maxSessions
        traffic.counts = snapshot.counts
        if snapshot.lastSessionStarted > 0 {
            traffic.lastSessionSeconds = Double(max(0, now - snapshot.lastSessionStarted)) / 1000
        }
        return traffic
    }
}

extension TrafficStats {
    /// Adds a backend's row into the BACKEND row.
    mutating func add(_ other: TrafficStats) {
        currentSessions += other.currentSessions
        maxSessions = max(maxSessions, other.maxSessions)
        sessionRate += other.sessionRate
        sessionRateMax = max(sessionRateMax, other.sessionRateMax)
        counts.add(other.counts)
        if let seconds = other.lastSessionSeconds {
            lastSessionSeconds = min(lastSessionSeconds ?? seconds, seconds)
        }
    }
}

/// Sessions per second per row, from totals sampled about once a second. The frontend row is
/// keyed with an empty backend name. Pure value.
struct RateSampler {
    private var previous: (time: Int64, totals: [BackendKey: UInt64])?
    private var current: [BackendKey: Double] = [:]
    private var highest: [BackendKey: Double] = [:]

    mutating func record(_ statistics: EngineStatistics, now: Int64) {
        var totals: [BackendKey: UInt64] = [:]
        for (frontend, counters) in statistics.frontends {
            totals[BackendKey(frontend: frontend, backend: "")] = counters.traffic.totalSessions
            for (backend, traffic) in counters.backends {
                totals[BackendKey(frontend: frontend, backend: backend)] = traffic.totalSessions
            }
        }
        if let previous, now > previous.time {
            let seconds = Double(now - previous.time) / 1000
            var rates: [BackendKey: Double] = [:]
            for (key, total) in totals {
                let before = previous.totals[key] ?? 0
                let rate = total >= before ? Double(total - before) / seconds : 0
                rates[key] = (rate * 10).rounded() / 10
                highest[key] = max(highest[key] ?? 0, rates[key]!)
            }
            current = rates
            highest = highest.filter { totals[$0.key] != nil }
        }
        previous = (now, totals)
    }

    func rate(_ key: BackendKey) -> (current: Double, max: Double) {
        (current[key] ?? 0, highest[key] ?? 0)
    }
}
