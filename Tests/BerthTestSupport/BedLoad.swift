// The failure matrix's client: sequential HTTP/1.0 GETs, one connection each, read to EOF, each
// bounded by a client-side timeout, made from inside a bed host. Every request is kept as a
// sample (when it started, how long it took, who answered or why it failed).
import BerthSystem
import Foundation
import Glibc
import Synchronization

/// One request.
public struct Sample: Sendable {
    /// Monotonic seconds when it started.
    public let start: Double
    public let seconds: Double
    /// The backend's name ("I'm NAME"), nil when it failed.
    public let answer: String?
    public let failure: String?
    public var failed: Bool { answer == nil }
}

public enum BedHTTP {
    /// GET / on address:port over a new connection (HTTP/1.0, read to EOF); the name whoami
    /// answered with. Throws on refusal, reset, an empty or non-HTTP answer, or `timeout`
    /// seconds in all. Uses the calling thread's network namespace.
    public static func get(_ address: String, _ port: Int, path: String = "/", timeout: Double) throws -> String {
        let text = try exchange(address, port, request: "GET \(path) HTTP/1.0\r\nHost: bed\r\n\r\n", timeout: timeout)
        guard text.hasPrefix("HTTP/1."), let split = text.range(of: "\r\n\r\n") else {
            throw FixtureFailure(text.isEmpty ? "empty response" : "not HTTP: \(text.prefix(80).debugDescription)")
        }
        guard text.hasPrefix("HTTP/1.1 200") || text.hasPrefix("HTTP/1.0 200") else {
            throw FixtureFailure("status \(text.prefix(20).debugDescription)")
        }
        let body = text[split.upperBound...].trimmingCharacters(in: .whitespacesAndNewlines)
        return body.hasPrefix("I'm ") ? String(body.dropFirst(4)) : body
    }

    /// The body of a GET (the stats server's JSON), same rules.
    public static func body(_ address: String, _ port: Int, path: String, timeout: Double = 3) throws -> String {
        let text = try exchange(address, port, request: "GET \(path) HTTP/1.0\r\nHost: bed\r\n\r\n", timeout: timeout)
        guard text.hasPrefix("HTTP/1.1 200") || text.hasPrefix("HTTP/1.0 200"), let split = text.range(of: "\r\n\r\n") else {
            throw FixtureFailure("GET \(path) from \(address):\(port): \(text.prefix(120).debugDescription)")
        }
        return String(text[split.upperBound...])
    }

    private static func exchange(_ address: String, _ port: Int, request: String, timeout: Double) throws -> String {
        let deadline = monotonicSeconds() + timeout
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FixtureFailure("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        func limit(_ option: CInt) throws {
            let left = deadline - monotonicSeconds()
            guard left > 0 else { throw FixtureFailure("client timeout (\(timeout) s)") }
            var value = timeval(tv_sec: Int(left), tv_usec: Int((left - Double(Int(left))) * 1e6) + 1)
            setsockopt(fd, SOL_SOCKET, option, &value, socklen_t(MemoryLayout<timeval>.size))
        }
        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, address, &target.sin_addr)
        try limit(SO_SNDTIMEO)  // bounds connect too
        let connected = withUnsafePointer(to: &target) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw FixtureFailure("connect: \(String(cString: strerror(errno)))") }
        let bytes = Array(request.utf8)
        guard send(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL)) == bytes.count else {
            throw FixtureFailure("send: \(String(cString: strerror(errno)))")
        }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while response.count < 4 * 1024 * 1024 {
            try limit(SO_RCVTIMEO)
            let got = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if got == 0 { break }
            if got < 0 {
                if errno == EINTR { continue }
                let reason = errno == EAGAIN ? "client timeout (\(timeout) s)" : String(cString: strerror(errno))
                throw FixtureFailure("\(reason) after \(response.count) bytes")
            }
            response += buffer[0..<got]
        }
        return String(decoding: response, as: UTF8.self)
    }
}

/// Sequential requests on a thread of its own, inside a bed host, until stop() or a bound:
/// `maximumRequests` requests or `maximumSeconds` seconds.
public final class RequestLoad: @unchecked Sendable {
    public let address: String
    public let port: Int
    public let timeout: Double
    public let pause: Double
    public static let maximumRequests = 100_000
    public static let maximumSeconds = 300.0
    private let recorded = Mutex<[Sample]>([])
    private let stopping = Atomic<Bool>(false)
    private var thread: OSThread?

    /// Starts at once: GETs to address:port from `host` of `bed`, `pause` seconds apart.
    public init(bed: NetworkTestBed, host: String, address: String, port: Int, timeout: Double = 5, pause: Double = 0.01) {
        self.address = address
        self.port = port
        self.timeout = timeout
        self.pause = pause
        thread = OSThread(name: "bed-load") { [self] in
            do {
                try bed.withNetwork(of: host) { run() }
            } catch {
                recorded.withLock { $0.append(Sample(start: monotonicSeconds(), seconds: 0, answer: nil, failure: "\(error)")) }
            }
        }
    }

    deinit { _ = stop() }

    private func run() {
        let began = monotonicSeconds()
        for _ in 0..<Self.maximumRequests {
            if stopping.load(ordering: .relaxed) || monotonicSeconds() - began > Self.maximumSeconds { return }
            let start = monotonicSeconds()
            let sample: Sample
            do {
                let answer = try BedHTTP.get(address, port, timeout: timeout)
                sample = Sample(start: start, seconds: monotonicSeconds() - start, answer: answer, failure: nil)
            } catch {
                sample = Sample(start: start, seconds: monotonicSeconds() - start, answer: nil, failure: "\(error)")
            }
            recorded.withLock { $0.append(sample) }
            if pause > 0 { usleep(useconds_t(pause * 1e6)) }
        }
    }

    /// The samples so far.
    public var samples: [Sample] { recorded.withLock { $0 } }

    /// Stops (after the request in flight) and returns every sample. Idempotent.
    @discardableResult
    public func stop() -> [Sample] {
        stopping.store(true, ordering: .relaxed)
        thread?.join()
        thread = nil
        return samples
    }
}

/// Figures of a set of samples, for the test output and the assertions.
public struct LoadSummary: CustomStringConvertible {
    public let count: Int
    public let failed: [Sample]
    public let answers: [String: Int]
    public let p50: Double
    public let p99: Double
    public let maximum: Double

    public init(_ samples: [Sample]) {
        count = samples.count
        failed = samples.filter(\.failed)
        var answers: [String: Int] = [:]
        for sample in samples { if let answer = sample.answer { answers[answer, default: 0] += 1 } }
        self.answers = answers
        let sorted = samples.map(\.seconds).sorted()
        func percentile(_ fraction: Double) -> Double {
            sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int((Double(sorted.count) * fraction).rounded(.up)) - 1)]
        }
        p50 = percentile(0.5)
        p99 = percentile(0.99)
        maximum = sorted.last ?? 0
    }

    public var description: String {
        let failures = failed.prefix(3).map { "\($0.failure ?? "?") after \(milliseconds($0.seconds))" }
        return "\(count) requests, \(failed.count) failed\(failures.isEmpty ? "" : " \(failures)"), "
            + "p50 \(milliseconds(p50)), p99 \(milliseconds(p99)), max \(milliseconds(maximum)), "
            + "answers \(answers.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))"
    }
}

public func milliseconds(_ seconds: Double) -> String { "\(Int((seconds * 1000).rounded())) ms" }
