import BerthSystem
import Glibc

/// A scenario: runs after the phases, with processes of its own, through the `berth` binary
/// (whose `proxy` command is the engine under `HealthRouter`: health checks, passive
/// ejection, retry-on), and prints a section of its own. Scenarios run in this order.
enum Scenario: String, CaseIterable, Sendable {
    /// One of three backends SIGKILLed under new-connection load, then restarted on its port:
    /// failed requests, time to ejection, time to traffic again; Berth without and with
    /// retry-on empty-response, and HAProxy with the same check settings.
    case failover
    /// Keep-alive throughput with no health checks and with 1,000 extra backends checked every
    /// second; the checks' CPU cost while the proxy is idle.
    case checks
    /// `berth discover` on a real etcd: how soon a put is routable, and the first sync of
    /// 1,000 services × 10 instances (time, RSS).
    case discovery
    /// Keep-alive throughput through `berth proxy` while its stats port is fuzzed (100k+ bad
    /// and oversized requests, slowloris), against quiet windows in the same run.
    case statsFuzz = "stats-fuzz"
    /// The failure matrix on hosts in network namespaces (HostsScenario.swift): a partition, a
    /// dead host, a silent backend, delay, loss, etcd cut off; `berth discover` beside HAProxy.
    case hosts
    /// New connections through `berth proxy` with each opt-in feature on (weights, balance
    /// modes, slow start, PROXY protocol, the connection log), against all off in the same
    /// round, and against an older binary (`--berth-before`) for "nothing changed when off".
    case features
    /// A fleet of simulated hosts, each a real `berth discover`, on one etcd, directly and
    /// through etcd's gRPC proxy: put → routable on every host under churn, etcd's cost, and
    /// the re-listing after an etcd restart. Only when named (it starts hundreds of processes).
    case fleet

    /// What runs when no scenario is named.
    static let byDefault = allCases.filter { $0 != .fleet }
}

/// The order of a scenario's windows without (false) and with (true) what it measures:
/// off, on, on, off (so that a drift of the machine weighs on both alike), twice, and twice more
/// per further `--repeat` round (single windows of one configuration vary by a third on the
/// development VM); off, on with `--quick`.
enum WindowOrder {
    static func alternating(_ options: BenchOptions) -> [Bool] {
        let block = options.quick ? [false, true] : [false, true, true, false, false, true, true, false]
        return Array(repeating: block, count: options.rounds).flatMap { $0 }
    }
}

/// When the failover scenario does what, in seconds after its load starts.
struct FailoverTimeline: Sendable {
    var killAt: Double
    var restartAt: Double
    var duration: Double

    static func make(quick: Bool) -> FailoverTimeline {
        quick ? FailoverTimeline(killAt: 0.6, restartAt: 1.6, duration: 3) : FailoverTimeline(killAt: 2, restartAt: 5, duration: 8)
    }
}

/// One row of the failover table: one proxy configuration through one kill and restart.
struct FailoverRow {
    var label: String
    /// The row's name in the JSON output.
    var name: String
    var skipped: String?
    var completed: UInt64 = 0
    var failed: UInt64 = 0
    /// Why requests failed, most frequent first.
    var reasons: [(reason: String, count: UInt64)] = []
    var seconds: Double = 0
    /// From SIGKILL to the end of the burst of refused connects (ms); see `FailoverScenario.ejection`.
    var ejectionMilliseconds: Double?
    /// Refused connects (the whole network namespace) in that burst.
    var refusedConnects: UInt64 = 0
    /// From the restarted backend listening to its first answer through the proxy (ms).
    var backMilliseconds: Double?
    /// From spawning the restarted backend to its listening (ms).
    var restartMilliseconds: Double?
    /// Answers per backend.
    var answers: [String: UInt64] = [:]
    /// Request times (connect to close), ms.
    var p99Milliseconds: Double = 0
    var maxMilliseconds: Double = 0
    /// What went wrong besides failed requests (the proxy exited, the restart failed).
    var remarks: [String] = []
}

/// One measured window of the checks scenario.
struct ChecksWindow {
    var checks: Bool
    var requestsPerSecond: Double
    var proxyCPUShare: Double?
    var loadCPUShare: Double?
    /// CPU of the proxy's worker thread per request (µs): the data plane's cost, apart from
    /// the checker thread's, and steadier than the throughput on a noisy machine.
    var workerMicrosecondsPerRequest: Double?
    /// Other processes' CPU plus steal (CPUs), as in the phases.
    var disturbance: Double
    var errors: UInt64
}

/// The proxy idle with its checks running.
struct IdleChecks {
    /// The check kind (`http`, `tcp`).
    var kind: String
    var seconds: Double
    /// The proxy process's, its checker thread's and the listeners' CPU, as a share of one core.
    var proxyShare: Double?
    var checkerShare: Double?
    var listenersShare: Double?
    /// Checks of the extra backends per second (connections the listeners accepted).
    var checksPerSecond: Double
    /// The busiest 100 ms of the window held this share of a second's checks (0.1 if even).
    var busiestTenthShare: Double?

    /// Checker-thread CPU per check, in µs.
    var microsecondsPerCheck: Double? {
        guard let checkerShare, checksPerSecond > 0 else { return nil }
        return checkerShare / checksPerSecond * 1e6
    }
}

/// The checks scenario's figures.
struct ChecksResult {
    var targets: Int
    var intervalMilliseconds: Int64
    var skipped: String?
    var failures: [String] = []
    var windows: [ChecksWindow] = []
    /// Idle measurements: with the HTTP checks of the windows, then with TCP checks.
    var idle: [IdleChecks] = []

    func mean(checks: Bool) -> Double? {
        let values = windows.filter { $0.checks == checks }.map(\.requestsPerSecond)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    func meanProxyShare(checks: Bool) -> Double? {
        let values = windows.filter { $0.checks == checks }.compactMap(\.proxyCPUShare)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    func meanWorkerCost(checks: Bool) -> Double? {
        let values = windows.filter { $0.checks == checks }.compactMap(\.workerMicrosecondsPerRequest)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    var ratio: Double? {
        guard let with = mean(checks: true), let without = mean(checks: false), without > 0 else { return nil }
        return with / without
    }
}

/// The discovery scenario's propagation: times from just before each put (ns).
struct Propagation {
    /// Until the answer came from the new backend, for the puts that routed in time.
    var routeNanoseconds: [UInt64] = []
    /// Until etcd acknowledged the put.
    var putNanoseconds: [UInt64] = []
    var timeouts = 0
    /// Answers from the previous backend after the acknowledgement, over all puts.
    var staleAnswers = 0

    func routeMilliseconds(_ percentile: Double) -> Double? { Self.percentile(routeNanoseconds, percentile) }
    func putMilliseconds(_ percentile: Double) -> Double? { Self.percentile(putNanoseconds, percentile) }

    /// The nearest-rank percentile of `values` (ns), in ms; nil when empty.
    static func percentile(_ values: [UInt64], _ percentile: Double) -> Double? {
        nearestRank(values.sorted(), percentile).map { Double($0) / 1e6 }
    }
}

/// The discovery scenario's initial sync.
struct SyncFigures {
    var transactions = 0
    /// Writing the registry (all transactions).
    var writeSeconds = 0.0
    /// From spawning `berth discover` until the first, and every, service port accepted.
    var firstPortMilliseconds: Double?
    var allPortsMilliseconds: Double?
    /// VmRSS once every port accepted, and of a `berth discover` with an empty registry.
    var residentBytes: UInt64?
    var emptyResidentBytes: UInt64?

    /// The RSS above the empty registry's, per instance (KiB).
    func kilobytesPerInstance(_ instances: Int) -> Double? {
        guard let residentBytes, let emptyResidentBytes, instances > 0 else { return nil }
        return (Double(residentBytes) - Double(emptyResidentBytes)) / 1024 / Double(instances)
    }
}

/// The discovery scenario's figures.
struct DiscoveryResult {
    var puts: Int
    var services: Int
    var instancesPerService: Int
    var skipped: String?
    var failures: [String] = []
    var propagation: Propagation?
    var sync: SyncFigures?

    var instances: Int { services * instancesPerService }

    /// Whether the propagation's p99 met the target (nil: not measured).
    var targetMet: Bool? {
        guard let propagation, let p99 = propagation.routeMilliseconds(99) else { return nil }
        return propagation.timeouts == 0 && p99 < DiscoveryScenario.targetP99Milliseconds
    }
}

/// Everything the scenarios measured.
struct ScenarioResults {
    var berthPath: String?
    var timeline: FailoverTimeline
    var failover: [FailoverRow]?
    var checks: ChecksResult?
    var discovery: DiscoveryResult?
    var statsFuzz: StatsFuzzResult?
    var hosts: HostsResult?
    var features: FeaturesResult?
    var fleet: FleetResult?
    var notes: [String] = []
}

/// Runs the scenarios asked for, one after the other, on this thread (pinned to the load CPU).
struct ScenarioRunner {
    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int
    /// The run's two whoami backends (the checks scenario's traffic goes to them).
    let web: [SocketAddress]
    /// PIDs of the run's backends (for the disturbance measure).
    let own: [pid_t]
    let haproxy: String?

    func run() -> ScenarioResults {
        var results = ScenarioResults(timeline: FailoverTimeline.make(quick: options.quick))
        guard let berth = Launcher.locateBerth(options.berthPath) else {
            let looked = options.berthPath ?? Launcher.defaultBerthPath()
            let reason = "no berth binary at \(looked): build it with swift build -c release --product berth (or pass --berth PATH)"
            results.notes.append("scenarios skipped: \(reason)")
            progress("scenarios skipped: \(reason)")
            return results
        }
        results.berthPath = berth
        if let stale = Launcher.staleness(ofBerth: berth) {
            results.notes.append("the berth binary may be stale: \(stale); rebuild it with swift build -c release --product berth")
        }
        for scenario in options.scenarios {
            switch scenario {
            case .failover:
                results.failover = FailoverScenario(options: options, timeline: results.timeline, proxyCPU: proxyCPU, loadCPU: loadCPU,
                                                    berth: berth, haproxy: haproxy,
                                                    withHAProxy: options.setups.contains(where: \.isHAProxy)).run()
            case .checks:
                results.checks = ChecksScenario(options: options, proxyCPU: proxyCPU, loadCPU: loadCPU, web: web, own: own,
                                                berth: berth).run()
            case .discovery:
                results.discovery = DiscoveryScenario(options: options, proxyCPU: proxyCPU, loadCPU: loadCPU, web: web, berth: berth).run()
            case .statsFuzz:
                results.statsFuzz = StatsFuzzScenario(options: options, proxyCPU: proxyCPU, loadCPU: loadCPU, berth: berth).run()
            case .features:
                results.features = FeaturesScenario(options: options, proxyCPU: proxyCPU, loadCPU: loadCPU, web: web, own: own,
                                                    berth: berth).run()
            case .fleet:
                results.fleet = FleetScenario(options: options, loadCPU: loadCPU, berth: berth).run()
            case .hosts:
                results.hosts = HostsScenario(options: options, berth: berth, haproxy: Launcher.locateHAProxy(options.haproxyPath)).run()
            }
        }
        return results
    }
}

/// The nearest-rank `percentile` (0 to 100) of `sorted`, ascending; nil when empty.
func nearestRank<Value>(_ sorted: [Value], _ percentile: Double) -> Value? {
    guard !sorted.isEmpty else { return nil }
    let rank = Int((percentile / 100 * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank, 1), sorted.count) - 1]
}
