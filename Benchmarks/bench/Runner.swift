import BerthSystem
import Glibc
import Histogram

/// Response-time percentiles of the latency phase, in microseconds.
struct LatencySummary {
    var p50: Double
    var p90: Double
    var p99: Double
    var p999: Double
    var max: Double
    var samples: UInt64
    /// The load generator's own lateness sending on-time requests (p99 and max, µs).
    var sendLagP99: Double
    var sendLagMax: Double

    init(latency: Histogram<UInt64>, sendLag: Histogram<UInt64>?) {
        func micro(_ nanoseconds: UInt64) -> Double { Double(nanoseconds) / 1_000 }
        p50 = micro(latency.valueAtPercentile(50))
        p90 = micro(latency.valueAtPercentile(90))
        p99 = micro(latency.valueAtPercentile(99))
        p999 = micro(latency.valueAtPercentile(99.9))
        max = micro(latency.max)
        samples = latency.totalCount
        sendLagP99 = micro(sendLag?.valueAtPercentile(99) ?? 0)
        sendLagMax = micro(sendLag?.max ?? 0)
    }
}

/// The figures of one phase against one setup.
struct PhaseMeasurement {
    var phase: Phase
    /// Requests, connections or bytes in the window.
    var operations: UInt64
    var errors: UInt64
    var lastError: String?
    var seconds: Double
    /// CPU seconds the proxy process used in the window (nil for direct).
    var proxyCPUSeconds: Double?
    /// Busy share (0...1) of each CPU in the window.
    var cpuBusy: [Double]
    /// CPUs' worth of time other processes used in the window (see `ResourceSnapshot`).
    var foreignCPUs: Double
    /// Share (0...1) of each CPU the hypervisor stole in the window.
    var steal: [Double]
    var latency: LatencySummary?
    /// The request rate asked for (open-loop phases).
    var rate: Int?
    var capped: Bool
    /// The round (from 1) this measurement comes from (see `--repeat`).
    var round = 1

    /// CPUs' worth of time taken from the bench by others: other processes, and the hypervisor.
    var disturbance: Double { foreignCPUs + steal.reduce(0, +) }

    /// The phase's figure: requests/s, connections/s, Gbit/s, or (latency) responses/s.
    var value: Double {
        guard seconds > 0 else { return 0 }
        switch phase {
        case .bulkSingle, .bulkMulti: return Double(operations) * 8 / seconds / 1e9
        default: return Double(operations) / seconds
        }
    }

    var unit: String { phase.unit }

    /// The proxy's CPU use as a share of its one core (0...1).
    var proxyCPUShare: Double? { proxyCPUSeconds.map { seconds > 0 ? $0 / seconds : 0 } }

    /// The proxy's CPU per unit of work: µs per request or connection, ms per GB for bulk.
    var cost: Double? {
        guard let proxyCPUSeconds, operations > 0 else { return nil }
        switch phase {
        case .bulkSingle, .bulkMulti: return proxyCPUSeconds * 1e3 / (Double(operations) / 1e9)
        default: return proxyCPUSeconds * 1e6 / Double(operations)
        }
    }

    var costUnit: String { phase.costUnit }
}

extension Phase {
    /// The unit of the phase's figure.
    var unit: String {
        switch self {
        case .keepAlive, .latency, .latencyHigh, .latencyLoaded, .keepAliveCrowd: "req/s"
        case .newConnections: "conn/s"
        case .bulkSingle, .bulkMulti: "Gbit/s"
        }
    }

    /// The unit of the proxy's CPU cost per unit of work.
    var costUnit: String {
        switch self {
        case .bulkSingle, .bulkMulti: "ms/GB"
        case .newConnections: "us/conn"
        case .keepAlive, .latency, .latencyHigh, .latencyLoaded, .keepAliveCrowd: "us/req"
        }
    }
}

/// Everything measured for one setup.
struct SetupResult {
    var setup: Setup
    var phases: [Phase: PhaseMeasurement] = [:]
    /// Phases that failed, with the reason.
    var failures: [Phase: String] = [:]
    /// Why the setup did not run at all.
    var skipped: String?
    /// Phases this setup cannot run, with the reason (shown as "-" and a note).
    var notMeasured: [Phase: String] = [:]
    /// The proxy process's CPU seconds over the whole setup, and its peak resident set.
    var cpuSeconds: Double?
    var peakRSS: UInt64?
}

/// The whole run, as the report needs it.
struct RunResult {
    var options: BenchOptions
    var setups: [SetupResult] = []
    var proxyCPU = 0
    var loadCPU = 1
    var cpuCount = 1
    var cpuModel = ""
    var kernel = ""
    var haproxyVersion: String?
    /// Run-level remarks (pinning impossible, HAProxy missing).
    var notes: [String] = []
    /// Busy share of the whole machine in the second before the run started.
    var idleCheckBusy: Double = 0
    /// The scenarios' figures (nil when none ran).
    var scenarios: ScenarioResults?
}

/// Runs the benchmark: backends, then each setup in turn with every phase, on this thread.
struct BenchmarkRunner {
    let options: BenchOptions

    /// Operation caps per phase (the window normally ends on time first).
    private static let requestCap: UInt64 = 100_000_000
    private static let connectionCap: UInt64 = 20_000_000
    private static let byteCap: UInt64 = 1 << 42
    static let haproxyMissing = "haproxy is not installed"
    /// Pause between phases, so that the proxy has closed the last phase's connections.
    private static let settleMicroseconds: UInt32 = 200_000

    func run() throws(BenchError) -> RunResult {
        var result = RunResult(options: options)
        result.cpuCount = availableCPUCount()
        result.cpuModel = ProcFS.cpuModel()
        result.kernel = ProcFS.kernelRelease()
        if result.cpuCount < 2 {
            result.loadCPU = 0
            result.notes.append("only one CPU: the proxy, load generator and backends share CPU 0")
        }
        if !pinCurrentThread(toCPU: result.loadCPU) {
            result.notes.append("could not pin the load generator to CPU \(result.loadCPU)")
        }
        let haproxy = options.setups.contains(where: \.isHAProxy) ? Launcher.locateHAProxy(options.haproxyPath) : nil
        if options.setups.contains(where: \.isHAProxy) {
            if let haproxy {
                result.haproxyVersion = Launcher.haproxyVersion(haproxy)
            } else {
                let looked = options.haproxyPath.map { "at \($0)" } ?? "(looked in /usr/sbin, /usr/local/sbin, PATH)"
                result.notes.append("haproxy not found \(looked): HAProxy rows skipped")
            }
        }

        // One second of the machine at rest: how busy others keep it before the bench starts.
        let before = ResourceSnapshot.take(proxy: nil, own: [])
        usleep(1_000_000)
        let shares = ResourceSnapshot.take(proxy: nil, own: []).busyShares(since: before)
        result.idleCheckBusy = shares.isEmpty ? 0 : shares.reduce(0, +) / Double(shares.count)
        if result.idleCheckBusy > 0.1 {
            result.notes.append("the machine was \(Format.fixed(result.idleCheckBusy * 100, 0))% busy before the run started: "
                + "other processes compete with the bench, expect noisy figures")
        }

        progress("starting backends on CPU \(result.loadCPU)")
        var backends: [ServingProcess] = []
        defer { for backend in backends { backend.stop() } }
        backends.append(try Launcher.startWhoami(name: "web0", cpu: result.loadCPU))
        backends.append(try Launcher.startWhoami(name: "web1", cpu: result.loadCPU))
        backends.append(try Launcher.startBulk(name: "bulk0", cpu: result.loadCPU))
        let web = [try backends[0].address("web0"), try backends[1].address("web1")]
        let bulk = try backends[2].address("bulk0")

        let own = backends.map(\.pid)
        var rounds: [[SetupResult]] = []
        for round in 1...options.rounds where !options.phases.isEmpty {
            if options.rounds > 1 { progress("round \(round) of \(options.rounds)") }
            rounds.append(options.setups.map { setup in
                var outcome = runSetup(setup, web: web, bulk: bulk, own: own, haproxy: haproxy, proxyCPU: result.proxyCPU)
                for phase in outcome.phases.keys { outcome.phases[phase]?.round = round }
                return outcome
            })
        }
        result.setups = rounds.isEmpty ? [] : options.setups.indices.map { index in Self.leastDisturbed(rounds.map { $0[index] }) }
        if options.rounds > 1 && !rounds.isEmpty {
            result.notes.append("\(options.rounds) rounds: each figure is from the least disturbed round (CPU used by other processes "
                + "plus time stolen by the hypervisor); CPU seconds are the median over the rounds, peak RSS the highest")
        }
        if !options.scenarios.isEmpty {
            result.scenarios = ScenarioRunner(options: options, proxyCPU: result.proxyCPU, loadCPU: result.loadCPU, web: web,
                                              own: own, haproxy: haproxy).run()
        }
        return result
    }

    /// Merges the rounds of one setup: per phase, the least disturbed measurement (CPU used by
    /// other processes plus time stolen by the hypervisor); the median of the proxy's CPU
    /// seconds; the highest peak RSS.
    static func leastDisturbed(_ rounds: [SetupResult]) -> SetupResult {
        let ran = rounds.filter { $0.skipped == nil }
        guard var merged = ran.first else { return rounds[0] }
        for phase in Phase.allCases {
            let candidates = ran.compactMap { $0.phases[phase] }
            if let best = candidates.min(by: { $0.disturbance < $1.disturbance }) {
                merged.phases[phase] = best
                merged.failures[phase] = nil
            } else {
                merged.failures[phase] = ran.lazy.compactMap { $0.failures[phase] }.first
            }
        }
        let cpu = ran.compactMap(\.cpuSeconds).sorted()
        merged.cpuSeconds = cpu.isEmpty ? nil : cpu[cpu.count / 2]
        merged.peakRSS = ran.compactMap(\.peakRSS).max()
        return merged
    }

    /// Starts the setup's proxy (if any), runs every phase through it, and stops it. `own` are
    /// the backends' PIDs (for the disturbance measure). Failures are recorded, not thrown.
    private func runSetup(_ setup: Setup, web: [SocketAddress], bulk: SocketAddress, own: [pid_t],
                          haproxy: String?, proxyCPU: Int) -> SetupResult {
        var result = SetupResult(setup: setup)
        var proxy: ServingProcess?
        do throws(BenchError) {
            switch setup {
            case .direct:
                break
            case .berth(let relay):
                proxy = try Launcher.startBerth(relay: relay, web: web, bulk: bulk, cpu: proxyCPU, wrapper: options.proxyWrapper)
            case .haproxy(let spliceAuto):
                guard let haproxy else {
                    result.skipped = Self.haproxyMissing
                    return result
                }
                proxy = try Launcher.startHAProxy(path: haproxy, spliceAuto: spliceAuto, web: web, bulk: bulk, cpu: proxyCPU)
            case .berthDefault:
                guard let berth = Launcher.locateBerth(options.berthPath) else {
                    result.skipped = "no berth binary at \(options.berthPath ?? Launcher.defaultBerthPath()) (swift build -c release --product berth)"
                    return result
                }
                proxy = try Launcher.startBerthDefault(path: berth, web: web)
            case .haproxyTwoThreads:
                guard let haproxy else {
                    result.skipped = Self.haproxyMissing
                    return result
                }
                proxy = try Launcher.startHAProxyTwoThreads(path: haproxy, web: web, bulk: bulk)
            }
        } catch {
            let reason = "could not start: \(error)"
            result.skipped = reason
            progress("\(setup.label): \(reason)")
            return result
        }
        defer { proxy?.stop() }
        if let proxy {
            let shared = setup.threads > 1 ? " (\(setup.threads) threads, shared with the load generator and backends)" : ""
            progress("\(setup.label): pid \(proxy.pid) on CPU \(setup.proxyCPUList(proxyCPU))\(shared)")
        }

        // The saturation point of latency-80: this setup's keep-alive requests/s in this round.
        var saturation: Double?
        for phase in options.phases {
            if phase.isBulk && !setup.servesBulk {
                result.notMeasured[phase] = "berth proxy serves one frontend; the bulk server is not behind it"
                continue
            }
            let targets: [SocketAddress]
            if let proxy {
                guard let address = try? proxy.address(phase.isBulk ? "bulk" : "web") else { continue }
                targets = [address]
            } else {
                targets = phase.isBulk ? [bulk] : web
            }
            do throws(BenchError) {
                if phase == .latencyLoaded && saturation == nil {
                    saturation = try measure(.keepAlive, targets: targets, proxy: proxy?.pid, own: own, seconds: 1).value
                }
                let measurement = try measure(phase, targets: targets, proxy: proxy?.pid, own: own, saturation: saturation)
                if phase == .keepAlive { saturation = measurement.value }
                result.phases[phase] = measurement
                progress(summary(setup, measurement))
            } catch {
                result.failures[phase] = "\(error)"
                progress("\(setup.label) \(phase.rawValue): failed: \(error)")
            }
            if let proxy, proxy.child.hasExited() {
                result.failures[phase] = "the proxy process exited (status \(proxy.child.exitStatus ?? -1))"
                progress("\(setup.label): the proxy exited; skipping its remaining phases")
                break
            }
            usleep(Self.settleMicroseconds)
        }
        if let proxy {
            result.cpuSeconds = proxy.cpuSeconds
            result.peakRSS = proxy.peakResidentBytes
        }
        return result
    }

    /// Runs one phase of load at `targets` and reduces it to its figures: for `seconds` (default:
    /// the run's phase length); latency-80 at `BenchOptions.loadedShare` of `saturation`.
    private func measure(_ phase: Phase, targets: [SocketAddress], proxy: pid_t?, own: [pid_t],
                         seconds: Double? = nil, saturation: Double? = nil) throws(BenchError) -> PhaseMeasurement {
        let workload: Workload
        var rate: Int?
        var cap = Self.requestCap
        switch phase {
        case .keepAlive:
            workload = .keepAlive(connections: options.keepAliveConnections)
        case .newConnections:
            workload = .newConnections(concurrency: options.concurrentConnects)
            cap = Self.connectionCap
        case .bulkSingle:
            workload = .bulk(streams: 1)
            cap = Self.byteCap
        case .bulkMulti:
            workload = .bulk(streams: options.bulkStreams)
            cap = Self.byteCap
        case .latency:
            rate = options.rate
            workload = .latency(rate: options.rate, connections: options.latencyConnections)
        case .latencyHigh:
            rate = BenchOptions.highRate
            workload = .latency(rate: BenchOptions.highRate, connections: options.loadedLatencyConnections)
        case .latencyLoaded:
            let asked = Int((saturation ?? 0) * BenchOptions.loadedShare)
            guard asked >= 1 else { throw .load("no saturation point measured for latency-80") }
            rate = asked
            workload = .latency(rate: asked, connections: options.loadedLatencyConnections)
        case .keepAliveCrowd:
            workload = .keepAlive(connections: options.crowdConnections, recordLatency: true)
        }
        let limits = PhaseLimits(
            warmup: UInt64(options.warmupSeconds * 1e9), duration: UInt64((seconds ?? options.phaseSeconds) * 1e9), operationCap: cap)
        let generator = try LoadGenerator(workload: workload, targets: targets, limits: limits)
        let outcome = try generator.run { ResourceSnapshot.take(proxy: proxy, own: own) }
        return PhaseMeasurement(
            phase: phase, operations: outcome.operations, errors: outcome.errors, lastError: outcome.lastError,
            seconds: outcome.seconds, proxyCPUSeconds: outcome.end.proxyCPUSeconds(since: outcome.start),
            cpuBusy: outcome.end.busyShares(since: outcome.start),
            foreignCPUs: outcome.end.foreignCPUs(since: outcome.start),
            steal: outcome.end.stealShares(since: outcome.start),
            latency: outcome.latency.map { LatencySummary(latency: $0, sendLag: outcome.sendLag) },
            rate: rate, capped: outcome.capped)
    }

    private func summary(_ setup: Setup, _ measurement: PhaseMeasurement) -> String {
        var text = "\(setup.label) \(measurement.phase.rawValue): "
        if let rate = measurement.rate { text += "at \(Format.grouped(UInt64(rate))) req/s, " }
        if measurement.phase == .keepAliveCrowd { text += "\(Format.rate(measurement.value)) req/s, " }
        if let latency = measurement.latency {
            text += "p50 \(Format.fixed(latency.p50, 1)) us, p99 \(Format.fixed(latency.p99, 1)) us, p99.9 \(Format.fixed(latency.p999, 1)) us, max \(Format.fixed(latency.max, 1)) us"
        } else if measurement.unit == "Gbit/s" {
            text += "\(Format.fixed(measurement.value, 2)) Gbit/s"
        } else {
            text += "\(Format.rate(measurement.value)) \(measurement.unit)"
        }
        if let share = measurement.proxyCPUShare { text += ", proxy CPU \(Format.fixed(share * 100, 0))%" }
        text += ", CPU busy " + measurement.cpuBusy.map { Format.fixed($0 * 100, 0) + "%" }.joined(separator: "/")
        if measurement.foreignCPUs >= 0.05 { text += ", others \(Format.fixed(measurement.foreignCPUs, 2)) CPU" }
        if measurement.steal.contains(where: { $0 >= 0.01 }) {
            text += ", steal " + measurement.steal.map { Format.fixed($0 * 100, 0) + "%" }.joined(separator: "/")
        }
        if let latency = measurement.latency, measurement.phase.isOpenLoop { text += ", gen lag p99 \(Format.fixed(latency.sendLagP99, 1)) us" }
        if measurement.errors > 0 { text += ", \(measurement.errors) errors (\(measurement.lastError ?? "?"))" }
        return text
    }
}
