import BerthSystem
import BerthStats
import BerthTestSupport
import Foundation
import Glibc
import Synchronization
import XCTest

/// Bad input to the stats port: random bytes, mutated and pipelined requests, 1 MB headers,
/// huge bodies and slowloris clients, 100,000 requests in all. The server must keep answering
/// (a probe asks /healthz throughout), end every bad connection, and come back to zero
/// connections; the data plane's throughput meanwhile is measured and printed.
final class FuzzTests: XCTestCase {
    /// Outcomes, counted over all fuzz threads.
    final class Tally: Sendable {
        let requests = Atomic<Int>(0)
        let connections = Atomic<Int>(0)
        let status2xx = Atomic<Int>(0)
        let status400 = Atomic<Int>(0)
        let status413 = Atomic<Int>(0)
        let status431 = Atomic<Int>(0)
        let other = Atomic<Int>(0)
        let noAnswer = Atomic<Int>(0)
        // The other threads of the test.
        let stop = Atomic<Bool>(false)
        let loadStop = Atomic<Bool>(false)
        let answered = Atomic<Int>(0)
        let probeFailures = Atomic<Int>(0)
        let probes = Atomic<Int>(0)
        let slowestProbe = Mutex<Double>(0)
        let slowClosed = Atomic<Int>(0)
        /// Microseconds spent per case kind (random, mutated, pipelined, body, headers).
        let spent = Mutex<[Int]>([0, 0, 0, 0, 0])

        func spend(_ kind: Int, _ seconds: Double) {
            spent.withLock { $0[kind] += Int(seconds * 1e6) }
        }

        func count(_ response: [UInt8]) {
            let text = String(decoding: response.prefix(12), as: UTF8.self)
            switch text.dropFirst(9).prefix(3) {
            case "200", "204": status2xx.add(1, ordering: .relaxed)
            case "400": status400.add(1, ordering: .relaxed)
            case "413": status413.add(1, ordering: .relaxed)
            case "431": status431.add(1, ordering: .relaxed)
            case "": noAnswer.add(1, ordering: .relaxed)
            default: other.add(1, ordering: .relaxed)
            }
        }

        var spentText: String {
            spent.withLock { $0 }.map { String($0 / 1000) + " ms" }.joined(separator: ", ")
        }
    }

    static let totalRequests = 100_000
    /// The test's time bound; on a loaded two-CPU machine (debug build) 100,000 requests take
    /// 40 to 60 s, so the count is asserted only as far as the time allowed.
    static let deadlineSeconds = 55.0

    func testFuzzedAndOversizedRequestsNeitherCrashNorBlock() throws {
        // With two CPUs or more, the data plane (worker, whoami backends, load client) runs on
        // CPU 0 and the stats side (NIO thread, fuzzing clients) on CPU 1: what is measured is
        // the stats server's effect on the data plane, not the fuzzing clients' CPU.
        let pinned = sysconf(CInt(_SC_NPROCESSORS_ONLN)) >= 2
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"])], cpus: pinned ? [0] : []) { configuration in
            configuration.requestTimeout = 1_000
            configuration.writeTimeout = 2_000
        }
        defer { stack.stop() }
        let stats = stack.statsAddress
        if pinned {
            Self.pinThreads(named: "whoami", to: 0)
            Self.pinThreads(named: StatsServer.threadName, to: 1)
        }
        let seed = UInt64.random(in: 0...UInt64.max)
        print("fuzz seed \(seed)")
        let tally = Tally()
        let started = monotonicSeconds()

        // The data plane: one keep-alive client through the proxy, counting answers per window.
        let load = Thread {
            if pinned { pinCurrentThread(toCPU: 0) }
            guard let fd = try? HTTP.connect(stack.frontends["web"]!) else { return }
            defer { close(fd) }
            let request = Array("GET / HTTP/1.1\r\nHost: t\r\n\r\n".utf8)
            var buffer = [UInt8](repeating: 0, count: 4096)
            while !tally.loadStop.load(ordering: .relaxed) {
                guard HTTP.send(fd, request) else { return }
                // whoami answers fit one read on loopback; count a read as an answer.
                let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if count <= 0 { return }
                tally.answered.add(1, ordering: .relaxed)
            }
        }
        load.start()
        usleep(300_000)
        let baseline = measure(tally, seconds: 3)

        // The probe: /healthz every 100 ms must answer throughout.
        let probe = Thread {
            if pinned { pinCurrentThread(toCPU: 1) }
            while !tally.stop.load(ordering: .relaxed) {
                let begin = monotonicSeconds()
                let status = (try? HTTP.request(stats, "GET", "/healthz").status) ?? 0
                let took = monotonicSeconds() - begin
                tally.slowestProbe.withLock { $0 = max($0, took) }
                tally.probes.add(1, ordering: .relaxed)
                if status != 200 { tally.probeFailures.add(1, ordering: .relaxed) }
                usleep(100_000)
            }
        }
        probe.start()

        // Slowloris: 100 connections that send a byte every 200 ms and never finish a request.
        let slowloris = Thread {
            if pinned { pinCurrentThread(toCPU: 1) }
            var fds: [CInt] = (0..<100).compactMap { _ in try? HTTP.connect(stats, timeout: 0.05) }
            let begin = monotonicSeconds()
            var index = 0
            while !fds.isEmpty && monotonicSeconds() - begin < 10 {
                index += 1
                let byte: [UInt8] = index == 1 ? Array("GET / HTTP/1.1\r\n".utf8) : [UInt8(ascii: "X")]
                fds = fds.filter { fd in
                    var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                    let closed = poll(&poller, 1, 0) > 0 || !HTTP.send(fd, byte)
                    if closed {
                        close(fd)
                        tally.slowClosed.add(1, ordering: .relaxed)
                    }
                    return !closed
                }
                usleep(200_000)
            }
            for fd in fds { close(fd) }
        }
        slowloris.start()
        tally.requests.add(100, ordering: .relaxed)

        let threads = (0..<4).map { thread in
            Thread {
                if pinned { pinCurrentThread(toCPU: 1) }
                var random = SplitMix64(seed: seed &+ UInt64(thread))
                let pipelines = StatsFuzzCases.pipelines(&random)
                while tally.requests.load(ordering: .relaxed) < Self.totalRequests,
                      monotonicSeconds() - started < Self.deadlineSeconds {
                    Self.fuzzOne(stats, &random, tally, pipelines: pipelines)
                }
            }
        }
        let fuzzStart = monotonicSeconds()
        for thread in threads { thread.start() }
        // Throughput during the first 5 s of the fuzzing; then the load stops, so that the rest
        // of the fuzzing has the machine (2 CPUs) to itself.
        var during = (rate: 0.0, workerMicroseconds: 0.0)
        var windows = 0
        while windows < 5 && threads.contains(where: { !$0.isFinished }) {
            let window = measure(tally, seconds: 1)
            during.rate += window.rate
            during.workerMicroseconds += window.workerMicroseconds
            windows += 1
        }
        tally.loadStop.store(true, ordering: .relaxed)
        while threads.contains(where: { !$0.isFinished }) || !slowloris.isFinished {
            usleep(50_000)
            if monotonicSeconds() - started > Self.deadlineSeconds + 15 { break }
        }
        let fuzzSeconds = monotonicSeconds() - fuzzStart
        tally.stop.store(true, ordering: .relaxed)
        tally.loadStop.store(true, ordering: .relaxed)
        for thread in [load, probe] + threads + [slowloris] {
            XCTAssertTrue(eventually(timeout: 10) { thread.isFinished })
        }

        let requests = tally.requests.load(ordering: .relaxed)
        let duringRate = windows > 0 ? during.rate / Double(windows) : 0
        let duringCost = windows > 0 ? during.workerMicroseconds / Double(windows) : 0
        print("""
            fuzz: \(requests) requests on \(tally.connections.load(ordering: .relaxed)) connections in \
            \(String(format: "%.1f", fuzzSeconds)) s: pipelined random requests answered \(tally.status2xx.load(ordering: .relaxed)), \
            400 \(tally.status400.load(ordering: .relaxed)), 413 \(tally.status413.load(ordering: .relaxed)), \
            431 \(tally.status431.load(ordering: .relaxed)), other \(tally.other.load(ordering: .relaxed)), \
            closed without answer \(tally.noAnswer.load(ordering: .relaxed)); slowloris closed by the server \
            \(tally.slowClosed.load(ordering: .relaxed))/100; /healthz probes \(tally.probes.load(ordering: .relaxed)), \
            slowest \(String(format: "%.3f", tally.slowestProbe.withLock { $0 })) s; time per kind (random, mutated, \
            pipelined, body, headers): \(tally.spentText)
            data plane (1 keep-alive client\(pinned ? "; data plane on CPU 0, stats and fuzzing on CPU 1" : "")): \(Int(baseline.rate)) req/s before, \(Int(duringRate)) req/s during the fuzzing \
            (\(String(format: "%+.1f", (duringRate / max(baseline.rate, 1) - 1) * 100))%); worker CPU per request \
            \(String(format: "%.1f", baseline.workerMicroseconds)) µs before, \(String(format: "%.1f", duringCost)) µs during
            """)
        if requests < Self.totalRequests {
            print("fuzz: the \(Self.deadlineSeconds) s bound ended the fuzzing at \(requests) requests")
        }
        // Not a speed test (the bench's stats-fuzz scenario measures that, on a release build):
        // the floor is a tenth of the target, far below the slowest run seen (30,000 requests
        // in the 55 s with a release build of all dependencies running beside it), and catches
        // a server that stopped answering.
        XCTAssertGreaterThanOrEqual(requests, Self.totalRequests / 10, "requests sent within \(Self.deadlineSeconds) s")
        XCTAssertEqual(tally.probeFailures.load(ordering: .relaxed), 0, "/healthz answered throughout")
        XCTAssertGreaterThan(tally.probes.load(ordering: .relaxed), 5)
        XCTAssertEqual(tally.slowClosed.load(ordering: .relaxed), 100, "every slowloris connection closed by the server")
        // Pipelined requests are most of the requests (100 per connection, 27% of connections),
        // and every one is answered; 400s answer the garbage (2.5% of the requests in every run).
        XCTAssertGreaterThan(tally.status2xx.load(ordering: .relaxed), requests / 2, "parsed requests amid the garbage were answered")
        XCTAssertGreaterThan(tally.status400.load(ordering: .relaxed), requests / 100)
        XCTAssertGreaterThan(tally.status431.load(ordering: .relaxed) + tally.noAnswer.load(ordering: .relaxed), 0)
        XCTAssertTrue(eventually(timeout: 5) { stack.server.connectionCounts.open == 0 }, "every connection ended: \(stack.server.connectionCounts)")
        XCTAssertEqual(try HTTP.request(stats, "GET", "/").status, 200, "still serving pages")
        XCTAssertEqual(try HTTP.request(stats, "GET", "/metrics").status, 200)
        XCTAssertGreaterThan(baseline.rate, 0)
    }

    /// Answers the load thread gave per second over a window, and the data-plane worker's CPU
    /// per answer (µs): its own cost, apart from what the fuzzing threads take from the machine.
    private func measure(_ tally: Tally, seconds: Double) -> (rate: Double, workerMicroseconds: Double) {
        let before = tally.answered.load(ordering: .relaxed)
        let ticksBefore = Self.workerTicks()
        usleep(useconds_t(seconds * 1e6))
        let count = tally.answered.load(ordering: .relaxed) - before
        let ticks = Self.workerTicks() - ticksBefore
        return (Double(count) / seconds, count > 0 ? Double(ticks) * 1e6 / Double(sysconf(CInt(_SC_CLK_TCK))) / Double(count) : 0)
    }

    private typealias SetAffinity = @convention(c) (pid_t, Int, UnsafeRawPointer) -> CInt
    /// glibc's `sched_setaffinity` (not exported by the Glibc module).
    private static let setAffinity: SetAffinity? = {
        guard let symbol = dlsym(nil, "sched_setaffinity") else { return nil }
        return unsafeBitCast(symbol, to: SetAffinity.self)
    }()

    /// Pins this process's threads whose name starts with `prefix` to `cpu` (by thread id).
    static func pinThreads(named prefix: String, to cpu: Int) {
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
            let comm = (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8)) ?? ""
            guard comm.hasPrefix(prefix), let tid = pid_t(task) else { continue }
            var set = cpu_set_t()
            withUnsafeMutableBytes(of: &set) { $0.storeBytes(of: UInt64(1) << UInt64(cpu), as: UInt64.self) }
            _ = withUnsafeBytes(of: &set) { setAffinity?(tid, MemoryLayout<cpu_set_t>.size, $0.baseAddress!) }
        }
    }

    /// utime + stime of this process's `berth-worker-*` threads, in clock ticks.
    static func workerTicks() -> Int {
        var total = 0
        for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
            let comm = (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8)) ?? ""
            guard comm.hasPrefix("berth-worker"),
                  let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // Fields after the command: state is the 3rd field, utime the 14th, stime the 15th.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            total += (Int(fields[11]) ?? 0) + (Int(fields[12]) ?? 0)
        }
        return total
    }

    /// One connection with one fuzz case; counts the requests it carried.
    /// `pipelines`: batches of 100 random requests made once per thread (making them costs more
    /// than sending them in a debug build).
    private static func fuzzOne(_ stats: SocketAddress, _ random: inout SplitMix64, _ tally: Tally, pipelines: [[UInt8]]) {
        let begin = monotonicSeconds()
        guard let fd = try? HTTP.connect(stats, timeout: 5) else { return }
        let fuzz = StatsFuzzCases.next(&random, pipelines: pipelines)
        defer {
            close(fd)
            tally.spend(fuzz.kind.rawValue, monotonicSeconds() - begin)
        }
        tally.connections.add(1, ordering: .relaxed)
        let (payload, requests) = (fuzz.payload, fuzz.requests)
        tally.requests.add(requests, ordering: .relaxed)
        _ = HTTP.send(fd, payload)
        // End of input: a partial request is not waited for (the server closes on EOF). The
        // pipelined requests end with `Connection: close` instead.
        if requests == 1 { shutdown(fd, CInt(SHUT_WR)) }
        let response = HTTP.receiveAll(fd, limit: 1 << 20)
        if requests > 1 {
            // Every answer counted (any status): the server answers each parsed request in turn.
            let text = String(decoding: response, as: UTF8.self)
            let answers = text.components(separatedBy: "HTTP/1.1 ").count - 1
            tally.status2xx.add(answers, ordering: .relaxed)
            if answers != requests { tally.other.add(1, ordering: .relaxed) }
        } else {
            tally.count(response)
        }
    }
}
