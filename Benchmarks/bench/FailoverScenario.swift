import BerthSystem
import Glibc
import Histogram

/// The failover scenario: three whoami backends (separate processes on the load CPU) behind a
/// proxy with health checks; new-connection load (`FailoverLoad`); at `killAt` one backend gets
/// SIGKILL (by its PID), at `restartAt` a new one is started on the same port. Each row starts
/// fresh backends and a fresh proxy: Berth (`berth proxy`) without and with
/// `--retry-on empty-response`, then HAProxy with the same check settings when it is installed.
///
/// Ejection is seen from outside the proxy: while a dead backend is still in the rotation, the
/// proxy's connects to it are refused, and the kernel counts each in `AttemptFails`
/// (/proc/net/snmp). After the SIGKILL the load generator samples that counter every
/// millisecond; the ejection time is the end of the first burst of refusals (the next refusal
/// more than `burstGap` later, such as the active check of the dead backend, is not part of it).
struct FailoverScenario {
    /// Check settings of both proxies (HAProxy: `check inter 200ms rise 3 fall 2`, `observe
    /// layer4 error-limit 3 on-error mark-down`, `retries 3`, `option redispatch`).
    static let checkInterval: Int64 = 200
    static let rise = 3
    static let fall = 2
    static let observeErrors = 3
    static let retries = 3
    /// A refusal this long after the previous one is not part of the burst. Before ejection the
    /// proxy tries the dead backend for about a third of the new connections (two or more per
    /// ms here); the dead backend's own checks come one per interval, so one lands within the
    /// gap after a burst about gap / interval of the time (2.5%) and then lengthens it. (With
    /// both proxies, 1-3 refusals also show up 11-13 ms after the kill in some runs: a 10 ms gap
    /// took them into the burst.)
    static let burstGap: UInt64 = 5_000_000
    /// How long after the SIGKILL the counter is sampled (at most until the restart).
    static let sampleSeconds = 2.0
    static let victimIndex = 2
    static let backendCount = 3

    let options: BenchOptions
    let timeline: FailoverTimeline
    let proxyCPU: Int
    let loadCPU: Int
    let berth: String
    /// HAProxy's path; nil: not installed. No HAProxy row when `withHAProxy` is false.
    let haproxy: String?
    let withHAProxy: Bool

    /// The flags of Berth's rows (the retry-on flag added in the second).
    static var berthFlags: [String] {
        ["--check", "http:/", "--check-interval", "\(checkInterval)ms", "--check-timeout", "\(checkInterval)ms",
         "--rise", "\(rise)", "--fall", "\(fall)", "--observe-errors", "\(observeErrors)", "--retries", "\(retries)"]
    }

    private enum Proxy {
        case berth(retryOnEmptyResponse: Bool)
        case haproxy(String)
    }

    func run() -> [FailoverRow] {
        var rows = [
            runRow(.berth(retryOnEmptyResponse: false), label: "berth", name: "berth"),
            runRow(.berth(retryOnEmptyResponse: true), label: "berth retry-on empty-response", name: "berth-retry-on-empty-response"),
        ]
        if !withHAProxy {
            return rows
        } else if let haproxy {
            rows.append(runRow(.haproxy(haproxy), label: "haproxy", name: "haproxy"))
        } else {
            rows.append(FailoverRow(label: "haproxy", name: "haproxy", skipped: BenchmarkRunner.haproxyMissing))
        }
        return rows
    }

    private func runRow(_ proxy: Proxy, label: String, name: String) -> FailoverRow {
        var row = FailoverRow(label: label, name: name)
        var backends: [ServingProcess] = []
        defer { for backend in backends { backend.stop() } }
        let serving: ServingProcess
        let target: SocketAddress
        var addresses: [SocketAddress] = []
        do throws(BenchError) {
            for index in 0..<Self.backendCount {
                backends.append(try Launcher.startWhoami(name: "app\(index)", cpu: loadCPU))
                addresses.append(try backends[index].address("app\(index)"))
            }
            switch proxy {
            case .berth(let retry):
                serving = try Launcher.startBerthBinary(
                    name: "failover", path: berth, backends: addresses, cpu: proxyCPU,
                    flags: Self.berthFlags + (retry ? ["--retry-on", "empty-response"] : []))
            case .haproxy(let path):
                serving = try Launcher.startHAProxyFailover(path: path, backends: addresses, cpu: proxyCPU)
            }
            target = try serving.address("failover")
        } catch {
            row.skipped = "could not start: \(error)"
            progress("failover \(label): \(row.skipped!)")
            return row
        }
        defer { serving.stop() }
        guard Launcher.awaitAnswer(from: target, timeout: Launcher.startTimeout) else {
            row.skipped = "no answer through the proxy within \(Launcher.startTimeout) ms"
            progress("failover \(label): \(row.skipped!)")
            return row
        }
        // Every backend checked at least once (checks start within the first interval).
        usleep(UInt32(Self.checkInterval * 2 * 1_000))
        progress("failover \(label): pid \(serving.pid) on CPU \(proxyCPU), \(Format.fixed(timeline.duration, 1)) s")

        let victim = backends[Self.victimIndex]
        let victimAddress = addresses[Self.victimIndex]
        var killBaseline: UInt64?
        var restarted: ServingProcess?
        var restartSpawned: UInt64 = 0
        var restartError: String?
        let actions = [
            TimedAction(offset: UInt64(timeline.killAt * 1e9)) {
                killBaseline = ProcFS.tcpCounter("AttemptFails")
                kill(victim.pid, SIGKILL)
            },
            TimedAction(offset: UInt64(timeline.restartAt * 1e9)) {
                restartSpawned = MonotonicClock.nanoseconds()
                do {
                    restarted = try Launcher.startWhoami(name: "app\(Self.victimIndex)", cpu: loadCPU, listen: victimAddress)
                } catch {
                    restartError = "\(error)"
                }
            },
        ]
        let outcome: FailoverOutcome
        do {
            let load = try FailoverLoad(target: target, concurrency: options.concurrentConnects,
                                        duration: UInt64(timeline.duration * 1e9), watched: "app\(Self.victimIndex)")
            let sampleEnd = min(timeline.restartAt, timeline.killAt + Self.sampleSeconds)
            outcome = load.run(actions: actions, sampleWindow: UInt64(timeline.killAt * 1e9)..<UInt64(sampleEnd * 1e9)) {
                ProcFS.tcpCounter("AttemptFails")
            }
        } catch {
            row.skipped = "the load did not start: \(error)"
            return row
        }
        restarted?.stop()
        if serving.child.hasExited() { row.remarks.append("the proxy process exited during the run") }

        row.completed = outcome.completed
        row.failed = outcome.failed
        row.reasons += outcome.failureReasons.sorted { $0.value > $1.value }.map { ($0.key, $0.value) }
        if let restartError { row.remarks.append("the restart failed: \(restartError)") }
        row.seconds = outcome.seconds
        row.answers = outcome.answers
        row.p99Milliseconds = Double(outcome.latency.valueAtPercentile(99)) / 1e6
        row.maxMilliseconds = Double(outcome.latency.max) / 1e6
        if outcome.actionTimes.count == 2, let killBaseline {
            let killed = outcome.actionTimes[0]
            if let (milliseconds, refused) = Self.ejection(baseline: killBaseline, killedAt: killed, samples: outcome.samples) {
                row.ejectionMilliseconds = milliseconds
                row.refusedConnects = refused
            }
            let ready = outcome.actionTimes[1]
            if restarted != nil {
                row.restartMilliseconds = Double(ready - restartSpawned) / 1e6
                row.backMilliseconds = outcome.watchedAnswers.first { $0 > ready }.map { Double($0 - ready) / 1e6 }
            }
        }
        progress("failover \(label): \(Format.grouped(row.completed)) answered, \(row.failed) failed, ejected after "
            + "\(row.ejectionMilliseconds.map { Format.fixed($0, 1) + " ms" } ?? "-"), traffic again "
            + "\(row.backMilliseconds.map { Format.fixed($0, 0) + " ms" } ?? "never") after the restart")
        return row
    }

    /// The end of the first burst of refused connects after `killedAt`: (ms after the kill,
    /// refusals in the burst), or nil when none was seen. `baseline` is the counter just before.
    static func ejection(baseline: UInt64, killedAt: UInt64, samples: [(time: UInt64, value: UInt64)]) -> (Double, UInt64)? {
        var last = baseline
        var burstEnd: UInt64?
        var refused: UInt64 = 0
        for sample in samples where sample.time >= killedAt && sample.value > last {
            if let end = burstEnd, sample.time - end > burstGap { break }
            refused += sample.value - last
            burstEnd = sample.time
            last = sample.value
        }
        return burstEnd.map { (Double($0 - killedAt) / 1e6, refused) }
    }
}
