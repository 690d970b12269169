import BerthSystem
import Glibc

/// One measured window of the stats-fuzz scenario.
struct StatsFuzzWindow {
    /// The stats thread on the data plane's CPU (else on the fuzzer's).
    var shared: Bool
    var fuzzing: Bool
    var requestsPerSecond: Double
    /// CPU of the proxy's worker thread per request (µs).
    var workerMicrosecondsPerRequest: Double?
    /// CPU of the proxy's stats thread over the window, as a share of one core.
    var statsThreadShare: Double?
    /// What the fuzzer did in the measured window (nil without fuzzing).
    var fuzz: FuzzTotals?
    var seconds: Double
    var disturbance: Double
    var errors: UInt64
}

/// The stats-fuzz scenario's figures.
struct StatsFuzzResult {
    var skipped: String?
    var failures: [String] = []
    var windows: [StatsFuzzWindow] = []
    /// The fuzzer's totals over every fuzzing window, warm-ups included.
    var fuzzTotals: FuzzTotals?
    /// The proxy's stats-server threads (its SwiftNIO loop) and their nice values.
    var statsThreads: [(name: String, nice: Int?)] = []
    /// After the last window: the proxy still running, its stats page answering, its fds and RSS.
    var aliveAfter = false
    var pageAfter = false
    var descriptorsBefore: Int?
    var descriptorsAfter: Int?
    var residentBefore: UInt64?
    var residentAfter: UInt64?

    func windows(shared: Bool, fuzzing: Bool) -> [StatsFuzzWindow] {
        windows.filter { $0.shared == shared && $0.fuzzing == fuzzing }
    }

    func mean(shared: Bool, fuzzing: Bool) -> Double? {
        let values = windows(shared: shared, fuzzing: fuzzing).map(\.requestsPerSecond)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    func meanWorkerCost(shared: Bool, fuzzing: Bool) -> Double? {
        let values = windows(shared: shared, fuzzing: fuzzing).compactMap(\.workerMicrosecondsPerRequest)
        return values.isEmpty ? nil : values.reduce(0, +) / Double(values.count)
    }

    /// Throughput while fuzzing over throughput while quiet, in one layout.
    func ratio(shared: Bool) -> Double? {
        guard let during = mean(shared: shared, fuzzing: true), let quiet = mean(shared: shared, fuzzing: false), quiet > 0 else { return nil }
        return during / quiet
    }

    func workerRatio(shared: Bool) -> Double? {
        guard let during = meanWorkerCost(shared: shared, fuzzing: true), let quiet = meanWorkerCost(shared: shared, fuzzing: false),
              quiet > 0 else { return nil }
        return during / quiet
    }

    /// Fuzzed requests in the measured windows.
    var measuredFuzzRequests: UInt64 { windows.compactMap(\.fuzz).reduce(0) { $0 + $1["requests"] } }
}

/// The stats-fuzz scenario: does abuse of the stats port (:1936) slow the data plane?
/// Keep-alive load (as the `keepalive` phase) through `berth proxy --stats`, in windows
/// without and with the `stats-fuzz` role hammering the stats server (StatsFuzzRole.swift:
/// random bytes, mutated and pipelined requests, 10 MB bodies, 1 MiB headers, slowloris,
/// a /healthz probe). One proxy for all windows, so that what the fuzzing leaves behind shows
/// in the quiet windows after it.
///
/// Two layouts, on a machine that may have two CPUs only. The data plane (the proxy's worker,
/// the two whoami backends, the load generator: this thread) runs on the proxy CPU, the fuzzer
/// on the load CPU, and the proxy's SwiftNIO thread (the stats server) is moved:
/// - **apart**: to the load CPU. What is left is the stats server's effect on the data plane
///   through the process (locks, counters read while workers write them, a shared loop), not
///   its CPU.
/// - **shared**: to the data plane's CPU, where it competes with the worker for the CPU, as it
///   does on a host whose cores are all busy. Berth runs that thread at a higher nice value
///   (`StatsServer.threadNice`) than the workers.
struct StatsFuzzScenario {
    /// Prefix of the proxy's stats-server thread names (SwiftNIO's event loop threads; `berth
    /// proxy` has no other SwiftNIO loop).
    static let statsThreadPrefix = "berth-stats"

    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int
    let berth: String

    /// Quiet (false) and fuzzing (true) windows.
    static func order(_ options: BenchOptions) -> [Bool] { WindowOrder.alternating(options) }

    func run() -> StatsFuzzResult {
        var result = StatsFuzzResult()
        var backends: [ServingProcess] = []
        defer { for backend in backends { backend.stop() } }
        let proxy: ServingProcess
        let address: SocketAddress
        let stats: SocketAddress
        do throws(BenchError) {
            for index in 0..<2 { backends.append(try Launcher.startWhoami(name: "fuzz-web-\(index)", cpu: proxyCPU)) }
            let web = try backends.enumerated().map { (index, backend) throws(BenchError) in try backend.address("fuzz-web-\(index)") }
            stats = SocketAddress(ipv4: (127, 0, 0, 1), port: try Launcher.freePort())
            proxy = try Launcher.startBerthBinary(name: "statsfuzz", path: berth, backends: web, cpu: proxyCPU,
                                                  flags: ["--stats", stats.description])
            address = try proxy.address("statsfuzz")
        } catch {
            result.skipped = "the proxy or its backends did not start: \(error)"
            progress("stats-fuzz: \(result.skipped!)")
            return result
        }
        defer { proxy.stop() }
        // The stats server starts once the data plane runs: its page may take a moment more.
        let deadline = MonotonicClock.milliseconds() + Launcher.startTimeout
        var pageUp = false
        for _ in 0..<1_000 where !pageUp && MonotonicClock.milliseconds() < deadline {
            pageUp = Self.pageAnswers(stats)
            if !pageUp { usleep(50_000) }
        }
        guard Launcher.awaitAnswer(from: address, timeout: Launcher.startTimeout), pageUp else {
            result.skipped = "no answer through the proxy, or from its stats page, within \(Launcher.startTimeout) ms"
            progress("stats-fuzz: \(result.skipped!)")
            return result
        }
        let statsThreads = ProcFS.threads(of: proxy.pid).filter { $0.name.hasPrefix(Self.statsThreadPrefix) }
        result.statsThreads = statsThreads.map { ($0.name, ProcFS.nice(of: proxy.pid, thread: $0.tid)) }
        if statsThreads.isEmpty {
            result.failures.append("no \(Self.statsThreadPrefix)* thread in the proxy")
        }
        pinCurrentThread(toCPU: proxyCPU)
        defer { pinCurrentThread(toCPU: loadCPU) }
        result.descriptorsBefore = ProcFS.openDescriptors(of: proxy.pid)
        result.residentBefore = ProcFS.residentBytes(of: proxy.pid)
        var totals: FuzzTotals?
        for shared in [false, true] {
            let cpu = shared ? proxyCPU : loadCPU
            for thread in statsThreads where !pinThread(thread.tid, toCPU: cpu) {
                result.failures.append("the stats thread \(thread.name) could not be moved to CPU \(cpu)")
            }
            for fuzzing in Self.order(options) {
                let label = "\(shared ? "shared" : "apart"), \(fuzzing ? "fuzzing" : "quiet")"
                do throws(BenchError) {
                    var (window, fuzzed) = try measureWindow(fuzzing: fuzzing, address: address, stats: stats, proxy: proxy.pid,
                                                             backends: backends.map(\.pid))
                    window.shared = shared
                    result.windows.append(window)
                    if let fuzzed { totals = totals.map { FuzzTotals(values: $0.values.merging(fuzzed.values, uniquingKeysWith: +)) } ?? fuzzed }
                    progress("stats-fuzz, \(label): \(Format.rate(window.requestsPerSecond)) req/s, worker "
                        + "\(window.workerMicrosecondsPerRequest.map { Format.fixed($0, 2) } ?? "-") us/req, stats thread "
                        + "\(window.statsThreadShare.map { Format.fixed($0 * 100, 0) + "%" } ?? "-")"
                        + (window.fuzz.map { ", \(Format.grouped($0["requests"])) fuzzed requests" } ?? "")
                        + (window.disturbance >= 0.05 ? ", others and steal \(Format.fixed(window.disturbance, 2)) CPU" : "")
                        + (window.errors > 0 ? ", \(window.errors) errors" : ""))
                } catch {
                    result.failures.append("\(label) window: \(error)")
                    progress("stats-fuzz, \(label) window: failed: \(error)")
                }
            }
        }
        result.fuzzTotals = totals
        usleep(500_000)  // connections the fuzzer left are closed by the server's timeouts
        result.aliveAfter = !proxy.child.hasExited()
        result.pageAfter = Self.pageAnswers(stats)
        result.descriptorsAfter = ProcFS.openDescriptors(of: proxy.pid)
        result.residentAfter = ProcFS.residentBytes(of: proxy.pid)
        return result
    }

    /// Whether the stats page (`GET /`) answers 200.
    static func pageAnswers(_ stats: SocketAddress) -> Bool {
        Launcher.fetch(from: stats, stepTimeout: 2_000)?.starts(with: Array("HTTP/1.1 200".utf8)) ?? false
    }

    /// One window; with `fuzzing`, a fuzzer runs through it (warm-up included). Returns the
    /// window and the fuzzer's totals over its whole run.
    private func measureWindow(fuzzing: Bool, address: SocketAddress, stats: SocketAddress, proxy: pid_t,
                               backends: [pid_t]) throws(BenchError) -> (StatsFuzzWindow, FuzzTotals?) {
        var fuzzer: ChildProcess?
        defer { fuzzer?.stop() }
        if fuzzing {
            let child = try ChildProcess.spawn(name: "stats-fuzz", path: currentExecutablePath(), arguments: [
                "--role", "stats-fuzz", "--target", stats.description, "--cpu", "\(loadCPU)",
                "--seconds", "\(Int(options.warmupSeconds + options.phaseSeconds) + 30)",
            ])
            fuzzer = child
            let line = try child.readLine(timeout: Launcher.startTimeout)
            guard line == "ready" else { throw BenchError.child("the fuzzer said '\(line.prefix(80))'") }
        }
        func query() -> FuzzTotals? {
            guard let fuzzer, fuzzer.send("?"), let line = try? fuzzer.readLine(timeout: 2_000) else { return nil }
            return FuzzTotals(parsing: line)
        }
        let limits = PhaseLimits(warmup: UInt64(options.warmupSeconds * 1e9), duration: UInt64(options.phaseSeconds * 1e9),
                                 operationCap: 100_000_000)
        let generator = try LoadGenerator(workload: .keepAlive(connections: options.keepAliveConnections), targets: [address], limits: limits)
        var workerTicks: [UInt64?] = []
        var statsTicks: [UInt64?] = []
        var fuzzEdges: [FuzzTotals?] = []
        let own = backends + (fuzzer.map { [$0.pid] } ?? [])
        let outcome = try generator.run {
            workerTicks.append(ProcFS.threadTicks(of: proxy, named: ChecksScenario.workerThread))
            statsTicks.append(ProcFS.threads(of: proxy).first { $0.name.hasPrefix(Self.statsThreadPrefix) }
                .flatMap { ProcFS.threadTicks(of: proxy, named: $0.name) })
            fuzzEdges.append(query())
            return ResourceSnapshot.take(proxy: proxy, own: own)
        }
        let final = query()
        let seconds = outcome.seconds
        let workerCost = ProcFS.cpuSeconds(between: workerTicks).flatMap { cpu in
            outcome.operations > 0 ? cpu * 1e6 / Double(outcome.operations) : nil
        }
        let statsShare = ProcFS.cpuSeconds(between: statsTicks).flatMap { cpu in seconds > 0 ? cpu / seconds : nil }
        var inWindow: FuzzTotals?
        if fuzzEdges.count == 2, let first = fuzzEdges[0], let last = fuzzEdges[1] { inWindow = last.since(first) }
        if fuzzing && inWindow == nil { throw BenchError.child("the fuzzer did not report its counts") }
        let window = StatsFuzzWindow(
            shared: false, fuzzing: fuzzing, requestsPerSecond: seconds > 0 ? Double(outcome.operations) / seconds : 0,
            workerMicrosecondsPerRequest: workerCost, statsThreadShare: statsShare, fuzz: inWindow,
            seconds: seconds,
            disturbance: outcome.end.foreignCPUs(since: outcome.start) + outcome.end.stealShares(since: outcome.start).reduce(0, +),
            errors: outcome.errors)
        return (window, final)
    }
}
