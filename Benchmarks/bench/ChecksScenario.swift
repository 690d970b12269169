import BerthSystem
import Glibc

/// The checks scenario: what health checks cost the data plane. Keep-alive load (as the
/// `keepalive` phase) through `berth proxy` with no checks, and through one whose frontend also
/// holds 1,000 extra backends checked every second: the `listeners` role's sockets on the load
/// CPU, which accept and close. Windows alternate (`order`), a fresh proxy each. After the
/// first window with checks, that proxy is left idle for a few seconds: its CPU, its checker
/// thread's, the listeners', the checks per second. Then the same idle with TCP checks.
///
/// `berth proxy` has one frontend, so the extra backends cannot sit in a second one: they are
/// kept out of the traffic by failing their checks instead. The checks are HTTP (`GET /`), the
/// listeners close without answering, and `--new-backend-state down` keeps them down from the
/// start (the two whoami backends come up at their first check, `--rise 1`). An HTTP check
/// against such a peer costs a connect plus a write and a read, a little more than a TCP check.
struct ChecksScenario {
    static let targets = 1_000
    static let interval: Int64 = 1_000
    /// How often the listeners' accept count is read in the idle window.
    static let queryMicroseconds: UInt32 = 10_000
    static let tenth: UInt64 = 100_000_000
    /// Thread names (`comm`) of `berth proxy`'s one worker and its checker.
    static let workerThread = "berth-worker-0"
    static let checkerThread = "berth-checks"

    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int
    let web: [SocketAddress]
    let own: [pid_t]
    let berth: String

    /// The flags of a proxy with checks of `kind` (`http:/` in the windows).
    static func checkFlags(_ kind: String) -> [String] {
        ["--check", kind, "--check-interval", "\(interval)ms", "--rise", "1", "--new-backend-state", "down", "--observe-errors", "0"]
    }

    var idleSeconds: Double { options.quick ? 2 : 5 }

    /// Windows without (false) and with (true) checks.
    static func order(_ options: BenchOptions) -> [Bool] { WindowOrder.alternating(options) }

    func run() -> ChecksResult {
        var result = ChecksResult(targets: Self.targets, intervalMilliseconds: Self.interval)
        let listeners: ServingProcess
        let ports: [UInt16]
        do {
            (listeners, ports) = try startListeners()
        } catch {
            result.skipped = "the listeners did not start: \(error)"
            progress("checks: \(result.skipped!)")
            return result
        }
        defer { listeners.stop() }
        let extra = ports.map { SocketAddress(ipv4: (127, 0, 0, 1), port: $0) }
        let order = Self.order(options)
        for checks in order {
            let label = checks ? "\(Format.grouped(UInt64(Self.targets))) checks/s" : "no checks"
            do throws(BenchError) {
                let proxy = try Launcher.startBerthBinary(name: "checks", path: berth, backends: checks ? web + extra : web,
                                                          cpu: proxyCPU, flags: checks ? Self.checkFlags("http:/") : [])
                defer { proxy.stop() }
                let address = try proxy.address("checks")
                guard Launcher.awaitAnswer(from: address, timeout: Launcher.startTimeout) else {
                    throw BenchError.child("no answer through the proxy within \(Launcher.startTimeout) ms")
                }
                if checks { awaitFirstChecks(listeners) }
                let window = try measureWindow(checks: checks, address: address, proxy: proxy.pid, listeners: listeners.pid)
                result.windows.append(window)
                progress("checks, \(label): \(Format.rate(window.requestsPerSecond)) req/s, proxy CPU "
                    + "\(window.proxyCPUShare.map { Format.fixed($0 * 100, 0) + "%" } ?? "-"), worker "
                    + "\(window.workerMicrosecondsPerRequest.map { Format.fixed($0, 2) } ?? "-") us/req"
                    + ", CPU \(loadCPU) \(window.loadCPUShare.map { Format.fixed($0 * 100, 0) + "%" } ?? "-")"
                    + (window.disturbance >= 0.05 ? ", others and steal \(Format.fixed(window.disturbance, 2)) CPU" : "")
                    + (window.errors > 0 ? ", \(window.errors) errors" : ""))
                if checks && result.idle.isEmpty, let idle = measureIdle(kind: "http", proxy: proxy.pid, listeners: listeners) {
                    result.idle.append(idle)
                }
            } catch {
                result.failures.append("\(label): \(error)")
                progress("checks, \(label): failed: \(error)")
            }
        }
        // TCP checks would bring the listeners up (into the traffic), so they are only measured idle.
        do throws(BenchError) {
            let proxy = try Launcher.startBerthBinary(name: "checks", path: berth, backends: web + extra, cpu: proxyCPU,
                                                      flags: Self.checkFlags("tcp"))
            defer { proxy.stop() }
            awaitFirstChecks(listeners)
            usleep(UInt32(Self.interval * 1_000))  // the first round's status changes republished
            if let idle = measureIdle(kind: "tcp", proxy: proxy.pid, listeners: listeners) { result.idle.append(idle) }
        } catch {
            result.failures.append("idle with TCP checks: \(error)")
            progress("checks, idle with TCP checks: failed: \(error)")
        }
        return result
    }

    /// `--role listeners` on the load CPU; its ports.
    private func startListeners() throws(BenchError) -> (ServingProcess, [UInt16]) {
        let child = try ChildProcess.spawn(name: "listeners", path: currentExecutablePath(), arguments: [
            "--role", "listeners", "--count", "\(Self.targets)", "--cpu", "\(loadCPU)",
        ])
        do throws(BenchError) {
            let line = try child.readLine(timeout: Launcher.startTimeout)
            let ports = line.hasPrefix("ports ") ? line.dropFirst(6).split(separator: ",").compactMap { UInt16($0) } : []
            guard ports.count == Self.targets, try child.readLine(timeout: Launcher.startTimeout) == "ready" else {
                throw BenchError.child("listeners said '\(line.prefix(60))'")
            }
            return (ServingProcess(child: child, addresses: [:]), ports)
        } catch {
            child.stop()
            throw error
        }
    }

    /// Connections the listeners accepted so far (one query on their stdin), or nil.
    private func accepted(_ listeners: ServingProcess) -> UInt64? {
        guard listeners.child.send("?"), let line = try? listeners.child.readLine(timeout: 1_000),
              line.hasPrefix("accepted ") else { return nil }
        return UInt64(line.dropFirst(9))
    }

    /// Waits (at most two intervals) until every extra backend has had its first check.
    private func awaitFirstChecks(_ listeners: ServingProcess) {
        let before = accepted(listeners) ?? 0
        let deadline = MonotonicClock.milliseconds() + 2 * Self.interval
        while MonotonicClock.milliseconds() < deadline, let now = accepted(listeners), now - before < UInt64(Self.targets) {
            usleep(20_000)
        }
    }

    private func measureWindow(checks: Bool, address: SocketAddress, proxy: pid_t, listeners: pid_t) throws(BenchError) -> ChecksWindow {
        let limits = PhaseLimits(warmup: UInt64(options.warmupSeconds * 1e9), duration: UInt64(options.phaseSeconds * 1e9),
                                 operationCap: 100_000_000)
        let generator = try LoadGenerator(workload: .keepAlive(connections: options.keepAliveConnections), targets: [address], limits: limits)
        // The probe runs at both edges of the window.
        var workerTicks: [UInt64?] = []
        let outcome = try generator.run {
            workerTicks.append(ProcFS.threadTicks(of: proxy, named: Self.workerThread))
            return ResourceSnapshot.take(proxy: proxy, own: own + [listeners])
        }
        let seconds = outcome.seconds
        let busy = outcome.end.busyShares(since: outcome.start)
        let workerCost = ProcFS.cpuSeconds(between: workerTicks).flatMap { cpu in
            outcome.operations > 0 ? cpu * 1e6 / Double(outcome.operations) : nil
        }
        return ChecksWindow(
            checks: checks, requestsPerSecond: seconds > 0 ? Double(outcome.operations) / seconds : 0,
            proxyCPUShare: outcome.end.proxyCPUSeconds(since: outcome.start).map { seconds > 0 ? $0 / seconds : 0 },
            loadCPUShare: busy.count > loadCPU ? busy[loadCPU] : nil, workerMicrosecondsPerRequest: workerCost,
            disturbance: outcome.end.foreignCPUs(since: outcome.start) + outcome.end.stealShares(since: outcome.start).reduce(0, +),
            errors: outcome.errors)
    }

    /// The proxy idle with its checks running, for `idleSeconds`: CPU shares, checks per second
    /// (the listeners' accepts), and how the checks are spread over the second.
    private func measureIdle(kind: String, proxy: pid_t, listeners: ServingProcess) -> IdleChecks? {
        usleep(200_000)  // the load's connections closed
        let hertz = ProcFS.ticksPerSecond
        let proxyBefore = ProcFS.cpuTicks(of: proxy)
        let checkerBefore = ProcFS.threadTicks(of: proxy, named: Self.checkerThread)
        let listenersBefore = ProcFS.cpuTicks(of: listeners.pid)
        let begin = MonotonicClock.nanoseconds()
        guard let first = accepted(listeners) else { return nil }
        var samples: [(time: UInt64, value: UInt64)] = [(begin, first)]
        let end = begin + UInt64(idleSeconds * 1e9)
        for _ in 0..<100_000 where MonotonicClock.nanoseconds() < end {
            usleep(Self.queryMicroseconds)
            if let value = accepted(listeners) { samples.append((MonotonicClock.nanoseconds(), value)) }
        }
        let seconds = Double(MonotonicClock.nanoseconds() - begin) / 1e9
        func share(_ before: UInt64?, _ after: UInt64?) -> Double? {
            guard let before, let after, after >= before else { return nil }
            return Double(after - before) / hertz / seconds
        }
        let checks = Double(samples.last!.value - first)
        var idle = IdleChecks(
            kind: kind, seconds: seconds, proxyShare: share(proxyBefore, ProcFS.cpuTicks(of: proxy)),
            checkerShare: share(checkerBefore, ProcFS.threadTicks(of: proxy, named: Self.checkerThread)),
            listenersShare: share(listenersBefore, ProcFS.cpuTicks(of: listeners.pid)), checksPerSecond: checks / seconds)
        var buckets = [UInt64](repeating: 0, count: Int(seconds * 10) + 1)
        for (previous, next) in zip(samples, samples.dropFirst()) {
            buckets[min(buckets.count - 1, Int((next.time - begin) / Self.tenth))] += next.value - previous.value
        }
        if checks > 0 { idle.busiestTenthShare = Double(buckets.max() ?? 0) / (checks / seconds) }
        progress("checks, idle with \(kind) checks, \(Format.fixed(seconds, 1)) s: \(Format.rate(idle.checksPerSecond)) checks/s, "
            + "proxy CPU \(idle.proxyShare.map { Format.fixed($0 * 100, 1) + "%" } ?? "-"), checker thread "
            + "\(idle.checkerShare.map { Format.fixed($0 * 100, 1) + "%" } ?? "-")")
        return idle
    }
}
