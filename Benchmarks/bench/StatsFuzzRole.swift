import BerthSystem
import BerthTestSupport
import Glibc
import Synchronization

/// `--role stats-fuzz --target HOST:PORT`: bad and oversized HTTP requests to a stats server,
/// without pause, until stopped (SIGTERM, SIGINT, end of file on stdin), `--seconds` have
/// passed or `--requests` were sent. The stats-fuzz scenario's fuzzer:
/// - three threads throwing the cases of `BerthStatsTests.FuzzTests` (`StatsFuzzCases`, in
///   BerthTestSupport: random bytes, mutated requests, 100 pipelined requests, 10 MB bodies,
///   1 MiB headers), one per connection, a single request half-closed after the send;
/// - beside them, 100 slowloris connections (one byte every 200 ms, never a whole request;
///   each one the server closes is replaced), and a `/healthz` probe every 100 ms.
///
/// Contract with the bench: `ready` on stdout once the threads run; each byte the bench writes
/// on stdin is answered with one `fuzz k=v ...` line of running totals (`FuzzTotals`).
enum StatsFuzzRole {
    static let fuzzThreads = 3
    static let slowlorisConnections = 100
    /// Bound on the queries answered over the role's life.
    static let queryLimit = 1_000_000
    /// Socket timeout of every step of a fuzz connection (connect, send, read), ms.
    static let stepTimeout: CInt = 5_000
    static let probeTimeout: CInt = 2_000

    /// Running totals, shared by the role's threads.
    final class Shared: Sendable {
        let stopping = Atomic<Bool>(false)
        let requests = Atomic<UInt64>(0)
        let connections = Atomic<UInt64>(0)
        /// Answers of any status to the pipelined requests.
        let pipelinedAnswers = Atomic<UInt64>(0)
        /// Statuses of the single-request connections.
        let status400 = Atomic<UInt64>(0)
        let status413 = Atomic<UInt64>(0)
        let status431 = Atomic<UInt64>(0)
        let otherStatus = Atomic<UInt64>(0)
        /// Single-request connections closed with no answer (legitimate for a request cut
        /// short by the server's limits while it was still being sent).
        let noAnswer = Atomic<UInt64>(0)
        /// Connections the fuzzer could not open.
        let connectFailures = Atomic<UInt64>(0)
        let slowlorisClosed = Atomic<UInt64>(0)
        let probes = Atomic<UInt64>(0)
        let probeFailures = Atomic<UInt64>(0)
        let slowestProbeMicroseconds = Atomic<UInt64>(0)
    }

    static func run(_ options: RoleOptions) throws(BenchError) {
        guard let target = options.target else { throw .child("--target is required") }
        let shared = Shared()
        let deadline = MonotonicClock.milliseconds() + Int64(options.seconds * 1_000)
        let budget = options.requests
        let seed = UInt64(truncatingIfNeeded: MonotonicClock.nanoseconds())
        var threads: [OSThread] = []
        for index in 0..<fuzzThreads {
            threads.append(OSThread(name: "bench-fuzz-\(index)") {
                var random = SplitMix64(seed: seed &+ UInt64(index))
                let pipelines = StatsFuzzCases.pipelines(&random)
                while !shared.stopping.load(ordering: .relaxed), MonotonicClock.milliseconds() < deadline,
                      shared.requests.load(ordering: .relaxed) < budget {
                    fuzzOne(target, &random, shared, pipelines: pipelines)
                }
            })
        }
        threads.append(OSThread(name: "bench-slowloris") { slowloris(target, shared, deadline: deadline) })
        threads.append(OSThread(name: "bench-probe") { probe(target, shared, deadline: deadline) })
        _ = OSThread(name: "bench-queries") { answerQueries(shared) }
        writeOut("ready\n")
        _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        shared.stopping.store(true, ordering: .relaxed)
        for thread in threads { thread.join() }
    }

    /// One line per byte read on stdin; end of file stops the role (SIGTERM to itself).
    private static func answerQueries(_ shared: Shared) {
        var byte: UInt8 = 0
        for _ in 0..<queryLimit {
            let count = Glibc.read(0, &byte, 1)
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            writeOut(FuzzTotals(shared).line + "\n")
        }
        kill(getpid(), SIGTERM)
    }

    // MARK: Cases

    /// One connection carrying one fuzz case; counts what it sent and what came back.
    private static func fuzzOne(_ target: SocketAddress, _ random: inout SplitMix64, _ shared: Shared, pipelines: [[UInt8]]) {
        guard var socket = BlockingSocket.connect(to: target, timeout: stepTimeout) else {
            shared.connectFailures.add(1, ordering: .relaxed)
            usleep(10_000)
            return
        }
        defer { socket.close() }
        shared.connections.add(1, ordering: .relaxed)
        let fuzz = StatsFuzzCases.next(&random, pipelines: pipelines)
        let (payload, requests) = (fuzz.payload, UInt64(fuzz.requests))
        shared.requests.add(requests, ordering: .relaxed)
        _ = socket.sendAll(payload)
        // A partial request is not waited for: the server closes on end of input. The pipelined
        // requests end with `Connection: close` instead.
        if requests == 1 { shutdown(socket.raw, CInt(SHUT_WR)) }
        let response = socket.receiveAll(limit: 1 << 20)
        if requests > 1 {
            shared.pipelinedAnswers.add(count(of: Array("HTTP/1.1 ".utf8), in: response), ordering: .relaxed)
            return
        }
        let status = statusCode(response)
        switch status {
        case nil: shared.noAnswer.add(1, ordering: .relaxed)
        case 400: shared.status400.add(1, ordering: .relaxed)
        case 413: shared.status413.add(1, ordering: .relaxed)
        case 431: shared.status431.add(1, ordering: .relaxed)
        default: shared.otherStatus.add(1, ordering: .relaxed)
        }
    }

    /// Keeps `slowlorisConnections` connections sending one byte every 200 ms; each one the
    /// server closes is counted and replaced.
    private static func slowloris(_ target: SocketAddress, _ shared: Shared, deadline: Int64) {
        var sockets: [CInt] = []
        defer { for fd in sockets { Glibc.close(fd) } }
        var sentStart = Set<CInt>()
        for _ in 0..<1_000_000 {
            guard !shared.stopping.load(ordering: .relaxed), MonotonicClock.milliseconds() < deadline else { return }
            while sockets.count < slowlorisConnections {
                guard var socket = BlockingSocket.connect(to: target, timeout: 200) else { break }
                sockets.append(socket.release())
            }
            sockets = sockets.filter { fd in
                let first = !sentStart.contains(fd)
                let bytes: [UInt8] = first ? Array("GET / HTTP/1.1\r\n".utf8) : [UInt8(ascii: "X")]
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                let closed = poll(&poller, 1, 0) > 0 || sent <= 0
                if closed {
                    Glibc.close(fd)
                    sentStart.remove(fd)
                    shared.slowlorisClosed.add(1, ordering: .relaxed)
                } else if first {
                    sentStart.insert(fd)
                }
                return !closed
            }
            usleep(200_000)
        }
    }

    /// `GET /healthz` every 100 ms: failures (no 200 within `probeTimeout`) and the slowest.
    private static func probe(_ target: SocketAddress, _ shared: Shared, deadline: Int64) {
        let request = Array("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)
        for _ in 0..<10_000_000 {
            guard !shared.stopping.load(ordering: .relaxed), MonotonicClock.milliseconds() < deadline else { return }
            let begin = MonotonicClock.nanoseconds()
            var ok = false
            if var socket = BlockingSocket.connect(to: target, timeout: probeTimeout) {
                ok = socket.sendAll(request) && statusCode(socket.receiveAll(limit: 64 * 1024)) == 200
                socket.close()
            }
            let took = (MonotonicClock.nanoseconds() - begin) / 1_000
            shared.probes.add(1, ordering: .relaxed)
            if !ok { shared.probeFailures.add(1, ordering: .relaxed) }
            var slowest = shared.slowestProbeMicroseconds.load(ordering: .relaxed)
            while took > slowest {
                let (exchanged, current) = shared.slowestProbeMicroseconds.compareExchange(expected: slowest, desired: took, ordering: .relaxed)
                if exchanged { break }
                slowest = current
            }
            usleep(100_000)
        }
    }

    // MARK: Parsing answers

    /// The status of an `HTTP/1.x NNN` answer, or nil.
    static func statusCode(_ response: [UInt8]) -> Int? {
        guard response.count >= 12, response.starts(with: Array("HTTP/1.".utf8)) else { return nil }
        return Int(String(decoding: response[9..<12], as: UTF8.self))
    }

    static func count(of needle: [UInt8], in haystack: [UInt8]) -> UInt64 {
        guard haystack.count >= needle.count else { return 0 }
        var found: UInt64 = 0
        var index = 0
        while index <= haystack.count - needle.count {
            if haystack[index] == needle[0] && haystack[index..<index + needle.count].elementsEqual(needle) {
                found += 1
                index += needle.count
            } else {
                index += 1
            }
        }
        return found
    }
}

/// The fuzz role's running totals, as it prints them and as the bench reads them back.
struct FuzzTotals: Sendable {
    var values: [String: UInt64]

    static let keys = [
        "requests", "connections", "pipelined_answers", "status400", "status413", "status431", "other_status",
        "no_answer", "connect_failures", "slowloris_closed", "probes", "probe_failures", "slowest_probe_us",
    ]

    init(_ shared: StatsFuzzRole.Shared) {
        let atomics = [
            shared.requests.load(ordering: .relaxed), shared.connections.load(ordering: .relaxed),
            shared.pipelinedAnswers.load(ordering: .relaxed), shared.status400.load(ordering: .relaxed),
            shared.status413.load(ordering: .relaxed), shared.status431.load(ordering: .relaxed),
            shared.otherStatus.load(ordering: .relaxed), shared.noAnswer.load(ordering: .relaxed),
            shared.connectFailures.load(ordering: .relaxed), shared.slowlorisClosed.load(ordering: .relaxed),
            shared.probes.load(ordering: .relaxed), shared.probeFailures.load(ordering: .relaxed),
            shared.slowestProbeMicroseconds.load(ordering: .relaxed),
        ]
        values = Dictionary(uniqueKeysWithValues: zip(Self.keys, atomics))
    }

    init(values: [String: UInt64]) {
        self.values = values
    }

    /// `fuzz k=v k=v ...`
    var line: String {
        "fuzz " + Self.keys.map { "\($0)=\(values[$0] ?? 0)" }.joined(separator: " ")
    }

    /// Reads `line` back; nil unless every key is there.
    init?(parsing line: String) {
        let words = line.split(separator: " ")
        guard words.first == "fuzz" else { return nil }
        var values: [String: UInt64] = [:]
        for word in words.dropFirst() {
            let parts = word.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let value = UInt64(parts[1]) else { return nil }
            values[String(parts[0])] = value
        }
        guard Self.keys.allSatisfy({ values[$0] != nil }) else { return nil }
        self.values = values
    }

    subscript(_ key: String) -> UInt64 { values[key] ?? 0 }

    /// The counts between `earlier` and these (the slowest probe is not a count: kept as is).
    func since(_ earlier: FuzzTotals) -> FuzzTotals {
        var values = self.values
        for key in Self.keys where key != "slowest_probe_us" {
            values[key] = (values[key] ?? 0) &- earlier[key]
        }
        return FuzzTotals(values: values)
    }
}

/// A blocking TCP client socket with a timeout on every send and read: the fuzzer's.
struct BlockingSocket: ~Copyable {
    private var descriptor: Descriptor

    var raw: CInt { descriptor.raw }

    private init(_ descriptor: consuming Descriptor) {
        self.descriptor = descriptor
    }

    /// Connects within `timeout` ms, then makes the socket blocking with that timeout on each
    /// send and read; nil on any failure (the socket closed).
    static func connect(to address: SocketAddress, timeout: CInt) -> BlockingSocket? {
        var connected = false
        guard var socket = try? Sockets.connect(to: address, connected: &connected) else { return nil }
        var poller = pollfd(fd: socket.raw, events: Int16(POLLOUT), revents: 0)
        guard connected || (poll(&poller, 1, timeout) == 1 && Sockets.pendingError(socket.raw) == 0) else {
            socket.close()
            return nil
        }
        let flags = fcntl(socket.raw, F_GETFL)
        var limit = timeval(tv_sec: Int(timeout / 1_000), tv_usec: Int(timeout % 1_000) * 1_000)
        let size = socklen_t(MemoryLayout<timeval>.size)
        guard flags >= 0, fcntl(socket.raw, F_SETFL, flags & ~O_NONBLOCK) == 0,
              setsockopt(socket.raw, SOL_SOCKET, SO_RCVTIMEO, &limit, size) == 0,
              setsockopt(socket.raw, SOL_SOCKET, SO_SNDTIMEO, &limit, size) == 0 else {
            socket.close()
            return nil
        }
        return BlockingSocket(socket)
    }

    /// Sends every byte; false when the peer closed, reset, or a send timed out.
    func sendAll(_ bytes: [UInt8]) -> Bool {
        var offset = 0
        let fd = descriptor.raw
        return bytes.withUnsafeBytes { buffer in
            for _ in 0..<100_000 where offset < buffer.count {
                let sent = Glibc.send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL))
                if sent < 0 && errno == EINTR { continue }
                if sent <= 0 { return false }
                offset += sent
            }
            return offset == buffer.count
        }
    }

    /// Reads until end of file, an error or a timeout, keeping at most `limit` bytes (the rest
    /// is read and dropped).
    func receiveAll(limit: Int) -> [UInt8] {
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        let fd = descriptor.raw
        for _ in 0..<100_000 {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            if response.count < limit { response += buffer[0..<min(count, limit - response.count)] }
        }
        return response
    }

    mutating func release() -> CInt { descriptor.release() }

    mutating func close() { descriptor.close() }
}
