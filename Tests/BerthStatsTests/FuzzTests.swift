import BerthEngine
import BerthStats
import Foundation
import Glibc
import Synchronization
import XCTest

/// Bad input to the stats port: random bytes, mutated and pipelined requests, 1 MB headers,
/// huge bodies and slowloris clients, 100,000 requests in all. The server must keep answering
/// (a probe asks /healthz throughout), end every bad connection, and come back to zero
/// connections; the data plane's throughput meanwhile is measured and printed.
final class FuzzTests: XCTestCase {
    /// SplitMix64: a seeded generator, so a failure can be replayed from the printed seed.
    struct Generator: RandomNumberGenerator {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }

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
            Self.pinThreads(named: "NIO-ELT", to: 1)
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
                var random = Generator(state: seed &+ UInt64(thread))
                let pipelines = (0..<20).map { _ in
                    (0..<100).flatMap { index in Self.randomRequest(&random, last: index == 99) }
                }
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
        XCTAssertGreaterThanOrEqual(requests, Self.totalRequests / 2, "at least half the requests sent within \(Self.deadlineSeconds) s")
        XCTAssertEqual(tally.probeFailures.load(ordering: .relaxed), 0, "/healthz answered throughout")
        XCTAssertGreaterThan(tally.probes.load(ordering: .relaxed), 5)
        XCTAssertEqual(tally.slowClosed.load(ordering: .relaxed), 100, "every slowloris connection closed by the server")
        XCTAssertGreaterThan(tally.status2xx.load(ordering: .relaxed), 10_000, "parsed requests amid the garbage were answered")
        XCTAssertGreaterThan(tally.status400.load(ordering: .relaxed), 1_000)
        XCTAssertGreaterThan(tally.status431.load(ordering: .relaxed) + tally.noAnswer.load(ordering: .relaxed), 0)
        XCTAssertTrue(eventually(timeout: 5) { stack.server.connectionCounts.open == 0 }, "every connection ended: \(stack.server.connectionCounts)")
        XCTAssertEqual(try HTTP.request(stats, "GET", "/").status, 200, "still serving pages")
        XCTAssertEqual(try HTTP.request(stats, "GET", "/metrics").status, 200)
        XCTAssertGreaterThan(baseline.rate, 0)
    }

    /// A request that parses, with random method, path, query, and header names and values.
    static func randomRequest(_ random: inout Generator, last: Bool) -> [UInt8] {
        let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
        // One request in ten asks for a rendered page; the rest for cheap answers (healthz, 404,
        // 405, admin errors), so that 100,000 fit in the time on a loaded two-CPU machine.
        let pages = ["/", "/stats", "/;csv", "/stats;csv", "/stats.json", "/metrics", "/?refresh="]
        let cheap = ["/healthz", "/admin/backends/web/a/", "/admin/backends/", "/%", "/;", "/x"]
        let printable = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/?".utf8)
        func text(_ count: Int, _ random: inout Generator) -> String {
            String(decoding: (0..<count).map { _ in printable[Int.random(in: 0..<printable.count, using: &random)] }, as: UTF8.self)
        }
        var request = methods[Int.random(in: 0..<methods.count, using: &random)] + " "
        let paths = Int.random(in: 0..<10, using: &random) == 0 ? pages : cheap
        request += paths[Int.random(in: 0..<paths.count, using: &random)] + text(Int.random(in: 0...40, using: &random), &random)
        request += " HTTP/1.1\r\nHost: x\r\n"
        for _ in 0..<Int.random(in: 0...4, using: &random) {
            let name = String(decoding: (0..<Int.random(in: 1...12, using: &random)).map { _ in
                UInt8(ascii: "a") + UInt8.random(in: 0...25, using: &random)
            }, as: UTF8.self)
            request += "X-\(name): \(text(Int.random(in: 0...60, using: &random), &random))\r\n"
        }
        if Int.random(in: 0..<4, using: &random) == 0 { request += "Authorization: Basic \(text(16, &random))\r\n" }
        request += "Content-Length: 0\r\n"
        if last { request += "Connection: close\r\n" }
        return Array((request + "\r\n").utf8)
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
    private static func fuzzOne(_ stats: SocketAddress, _ random: inout Generator, _ tally: Tally, pipelines: [[UInt8]]) {
        let begin = monotonicSeconds()
        guard let fd = try? HTTP.connect(stats, timeout: 5) else { return }
        var kind = 0
        defer {
            close(fd)
            tally.spend(kind, monotonicSeconds() - begin)
        }
        tally.connections.add(1, ordering: .relaxed)
        let valid = Array("GET /stats.json HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        var payload: [UInt8]
        var requests = 1
        switch Int.random(in: 0..<100, using: &random) {
        case 0..<45:
            // Random bytes, 1 to 512 of them.
            payload = (0..<Int.random(in: 1...512, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
        case 45..<70:
            kind = 1
            // A valid request with a few bytes changed, inserted or cut.
            payload = valid
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                let position = Int.random(in: 0..<payload.count, using: &random)
                switch Int.random(in: 0..<3, using: &random) {
                case 0: payload[position] = UInt8.random(in: 0...255, using: &random)
                case 1: payload.insert(UInt8.random(in: 0...255, using: &random), at: position)
                default: payload.remove(at: position)
                }
            }
        case 70..<97:
            kind = 2
            // 100 pipelined requests, each with a random method, path, query and headers that
            // still parse (unknown pages, methods and credentials are answered and the
            // connection lives on); the last asks to close.
            requests = 100
            payload = pipelines[Int.random(in: 0..<pipelines.count, using: &random)]
        case 97..<99:
            kind = 3
            // An announced 10 MB body.
            payload = Array("POST /admin/backends/web/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n".utf8)
                + [UInt8](repeating: 0x41, count: 16 * 1024)
        default:
            kind = 4
            // 1 MB of headers.
            payload = Array("GET / HTTP/1.1\r\nX-Big: ".utf8) + [UInt8](repeating: 0x61, count: 1 << 20)
        }
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
