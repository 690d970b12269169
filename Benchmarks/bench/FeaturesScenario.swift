import BerthSystem
import Glibc

/// The features scenario: what each opt-in feature of `berth proxy` costs on the new-connection
/// path, and that with all of them off nothing changed. New-connection load (as the `connect`
/// phase) through `berth proxy`, one worker on the proxy CPU, once per variant: the binary as
/// built with its defaults ("off"), the same with one feature on (balance modes, weights, slow
/// start, PROXY protocol, the connection log), and, with `--berth-before PATH`, an older binary
/// with its defaults ("before": the same run's baseline for "nothing changed"). Each round runs
/// every variant once, in an order rotated by round, a fresh proxy each window; every ratio is
/// taken against "off" of the same round.
struct FeaturesScenario {
    /// One configuration of the proxy.
    struct Variant: Sendable {
        var name: String
        var flags: [String]
        /// The backends read a PROXY protocol header (whoami --accept-proxy).
        var proxied = false
        /// Runs the `--berth-before` binary.
        var before = false
        /// Backend weights, in the order of the backends (nil: none given).
        var weights: [Int]?
        /// The second backend is put in maintenance and back through the admin API once the
        /// proxy answers, so that it ramps up (slow start) through the whole window.
        var ramping = false
    }

    static let variants: [Variant] = [
        Variant(name: "before", flags: [], before: true),
        Variant(name: "off", flags: []),
        Variant(name: "weights 3,1", flags: [], weights: [3, 1]),
        Variant(name: "leastconn", flags: ["--balance", "leastconn"]),
        Variant(name: "source", flags: ["--balance", "source"]),
        Variant(name: "slow-start 60s (ramping)", flags: ["--slow-start", "60s"], ramping: true),
        Variant(name: "send-proxy v1", flags: ["--send-proxy", "v1"], proxied: true),
        Variant(name: "send-proxy v2", flags: ["--send-proxy", "v2"], proxied: true),
        Variant(name: "log-connections plain", flags: ["--log-connections", "--log-format", "plain"]),
        Variant(name: "log-connections json", flags: ["--log-connections", "--log-format", "json"]),
    ]

    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int
    /// The run's plain whoami backends.
    let web: [SocketAddress]
    let own: [pid_t]
    let berth: String

    /// The variants this run can measure (no "before" without `--berth-before`).
    var variants: [Variant] {
        Self.variants.filter { !$0.before || options.berthBeforePath != nil }
    }

    /// The variants of round `round`, rotated so that none is always first or last.
    func order(round: Int) -> [Variant] {
        let all = variants
        guard !all.isEmpty else { return [] }
        let shift = round % all.count
        return Array(all[shift...] + all[..<shift])
    }

    func run() -> FeaturesResult {
        var result = FeaturesResult(variants: variants.map(\.name))
        // Two backends that read a PROXY header, on the load CPU as the run's web backends.
        var proxiedBackends: [ServingProcess] = []
        defer { for backend in proxiedBackends { backend.stop() } }
        do throws(BenchError) {
            for index in 0..<2 {
                proxiedBackends.append(try Launcher.startWhoami(name: "pp\(index)", cpu: loadCPU, acceptProxy: true))
            }
        } catch {
            result.skipped = "the PROXY-protocol backends did not start: \(error)"
            progress("features: \(result.skipped!)")
            return result
        }
        let proxiedAddresses = proxiedBackends.enumerated().compactMap { index, backend in try? backend.address("pp\(index)") }
        for round in 0..<(options.quick ? 1 : options.rounds * 2) {
            for variant in order(round: round) {
                let path = variant.before ? options.berthBeforePath! : berth
                let backends = variant.proxied ? proxiedAddresses : web
                do throws(BenchError) {
                    let window = try measure(variant, path: path, backends: backends, round: round)
                    result.windows.append(window)
                    progress("features, round \(round + 1), \(variant.name): \(Format.rate(window.connectionsPerSecond)) conn/s, "
                        + "proxy \(window.proxyMicrosecondsPerConnection.map { Format.fixed($0, 1) } ?? "-") us/conn"
                        + (window.errors > 0 ? ", \(window.errors) errors" : "")
                        + (window.disturbance >= 0.05 ? ", others and steal \(Format.fixed(window.disturbance, 2)) CPU" : ""))
                } catch {
                    result.failures.append("\(variant.name), round \(round + 1): \(error)")
                    progress("features, \(variant.name): failed: \(error)")
                }
            }
        }
        return result
    }

    private func measure(_ variant: Variant, path: String, backends: [SocketAddress], round: Int) throws(BenchError) -> FeaturesWindow {
        var flags = variant.flags
        let stats = variant.ramping ? try Launcher.freePort() : 0
        if variant.ramping { flags += ["--stats", "127.0.0.1:\(stats)", "--stats-auth", "bench:bench"] }
        let proxy = try Launcher.startBerthBinary(name: "features", path: path, backends: backends, cpu: proxyCPU,
                                                  flags: flags, weights: variant.weights)
        defer { proxy.stop() }
        let address = try proxy.address("features")
        guard Launcher.awaitAnswer(from: address, timeout: Launcher.startTimeout) else {
            throw BenchError.child("no answer through the proxy within \(Launcher.startTimeout) ms")
        }
        if variant.ramping, let second = backends.dropFirst().first {
            for action in ["maint", "enable"] {
                try control(path, [action, "features", second.description, "--stats", "127.0.0.1:\(stats)", "--auth", "bench:bench"])
            }
        }
        let limits = PhaseLimits(warmup: UInt64(options.warmupSeconds * 1e9), duration: UInt64(options.phaseSeconds * 1e9),
                                 operationCap: 100_000_000)
        let generator = try LoadGenerator(workload: .newConnections(concurrency: options.concurrentConnects), targets: [address],
                                          limits: limits)
        let outcome = try generator.run { ResourceSnapshot.take(proxy: proxy.pid, own: own) }
        let seconds = outcome.seconds
        let cpu = outcome.end.proxyCPUSeconds(since: outcome.start)
        return FeaturesWindow(
            variant: variant.name, round: round,
            connectionsPerSecond: seconds > 0 ? Double(outcome.operations) / seconds : 0,
            proxyMicrosecondsPerConnection: cpu.flatMap { outcome.operations > 0 ? $0 * 1e6 / Double(outcome.operations) : nil },
            disturbance: outcome.end.foreignCPUs(since: outcome.start) + outcome.end.stealShares(since: outcome.start).reduce(0, +),
            errors: outcome.errors)
    }
}

extension FeaturesScenario {
    /// Runs `berth ctl ARGUMENTS` and waits for it (at most 10 s); throws unless it exits 0.
    func control(_ berth: String, _ arguments: [String]) throws(BenchError) {
        let child = try ChildProcess.spawn(name: "berth ctl", path: berth, arguments: ["ctl"] + arguments, logFile: "/dev/null")
        let deadline = MonotonicClock.milliseconds() + 10_000
        while !child.hasExited() && MonotonicClock.milliseconds() < deadline { usleep(5_000) }
        guard child.hasExited(), let status = child.exitStatus, status == 0 else {
            child.stop()
            throw .child("berth ctl \(arguments.prefix(2).joined(separator: " ")) failed")
        }
    }
}

/// One window of the features scenario.
struct FeaturesWindow {
    var variant: String
    var round: Int
    var connectionsPerSecond: Double
    var proxyMicrosecondsPerConnection: Double?
    var disturbance: Double
    var errors: UInt64
}

/// What the features scenario measured.
struct FeaturesResult {
    var variants: [String]
    var skipped: String?
    var failures: [String] = []
    var windows: [FeaturesWindow] = []

    func windows(_ variant: String) -> [FeaturesWindow] { windows.filter { $0.variant == variant } }

    func mean(_ variant: String) -> Double? {
        let values = windows(variant).map(\.connectionsPerSecond)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    func meanCost(_ variant: String) -> Double? {
        let values = windows(variant).compactMap(\.proxyMicrosecondsPerConnection)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    /// Per round, `variant`'s figure over "off"'s in the same round.
    func ratios(_ variant: String, _ value: (FeaturesWindow) -> Double?) -> [Double] {
        windows(variant).compactMap { window in
            guard let base = windows("off").first(where: { $0.round == window.round }), let top = value(window),
                  let bottom = value(base), bottom > 0 else { return nil }
            return top / bottom
        }
    }

    static func median(_ values: [Double]) -> Double? {
        guard !values.isEmpty else { return nil }
        let sorted = values.sorted()
        return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
    }
}
