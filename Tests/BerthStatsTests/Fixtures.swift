// Fixtures of BerthStatsTests: an in-process stack (engine under a HealthRouter, whoami backends,
// the stats server, all on 127.0.0.1 port 0), a blocking HTTP client, and a runner for the real
// tools (chromium, haproxy, promtool). Everything is bounded in time.
import BerthEngine
import BerthSystem
import BerthHealth
import BerthStats
import BerthWhoami
import Foundation
import Glibc
import XCTest

/// Seconds on the monotonic clock.
func monotonicSeconds() -> Double { Double(MonotonicClock.nanoseconds()) / 1e9 }

/// Waits (bounded) for `condition`; true if it held in time.
func eventually(timeout: Double, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicSeconds() + timeout
    while monotonicSeconds() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// Engine + HealthRouter + StatsServer in this process, with whoami backends.
final class StatsStack: @unchecked Sendable {
    struct Service {
        var name: String
        /// Live whoami backends to start, by id.
        var backends: [String]
        /// Addresses where nothing listens (shown DOWN with checks).
        var deadBackends = 0
    }

    let router: HealthRouter
    let server: StatsServer
    let statsAddress: SocketAddress
    private(set) var whoamis: [WhoamiServer] = []
    /// Frontend name → bound address.
    private(set) var frontends: [String: SocketAddress] = [:]

    init(services: [Service], checks: CheckSettings? = nil, credentials: String? = nil, workers: Int = 1,
         cpus: [Int] = [], configure: (inout StatsServerConfiguration) -> Void = { _ in }) throws {
        var configuration = EngineConfiguration()
        configuration.workers = workers
        configuration.cpus = cpus
        router = try HealthRouter.make(configuration: configuration, policy: HealthPolicy(checks: checks))
        var table = RoutingTable()
        var backendsByID: [String: Backend] = [:]
        for service in services {
            var backends: [Backend] = []
            for id in service.backends {
                let whoami = try WhoamiServer(listen: try SocketAddress(parsing: "127.0.0.1:0"), identity: id)
                whoamis.append(whoami)
                let backend = Backend(name: id, address: whoami.address)
                backendsByID[id] = backend
                backends.append(backend)
            }
            for index in 0..<service.deadBackends {
                backends.append(Backend(name: "\(service.name)-dead\(index)", address: try Self.unusedAddress()))
            }
            table.frontends.append(Frontend(name: service.name, listen: try SocketAddress(parsing: "127.0.0.1:0"),
                                            backends: backends, settings: FrontendSettings(retries: 3, connectTimeout: 500)))
        }
        let result = try router.apply(table)
        frontends = result.listening
        var statsConfiguration = StatsServerConfiguration(listen: try SocketAddress(parsing: "127.0.0.1:0"), version: "test")
        statsConfiguration.credentials = credentials.flatMap(StatsCredentials.init)
        configure(&statsConfiguration)
        server = StatsServer(configuration: statsConfiguration, provider: .router(router))
        statsAddress = try server.start()
    }

    func stop() {
        server.stop()
        router.shutdown(drainTimeout: 0)
        for whoami in whoamis { whoami.stop() }
    }

    /// A 127.0.0.1 port nothing listens on (bound, then closed).
    static func unusedAddress() throws -> SocketAddress {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        let address = try Sockets.localAddress(socket.raw)
        socket.close()
        return address
    }
}

/// A blocking HTTP/1.1 client over a plain socket with send/receive timeouts.
enum HTTP {
    struct Response {
        var status: Int
        var headers: [String: String]
        var body: String
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// A connected blocking socket with timeouts (caller closes).
    static func connect(_ address: SocketAddress, timeout: Double = 5) throws -> CInt {
        let fd = socket(AF_INET, CInt(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        var time = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = address.port.bigEndian
        inet_pton(AF_INET, address.host, &sin.sin_addr)
        let result = withUnsafePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard result == 0 else {
            let code = errno
            close(fd)
            throw Failure(description: "connect \(address): errno \(code)")
        }
        return fd
    }

    /// Sends everything (false on error: the peer closed or reset).
    @discardableResult
    static func send(_ fd: CInt, _ bytes: [UInt8]) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, CInt(MSG_NOSIGNAL)) }
            if sent < 0 && errno == EINTR { continue }
            if sent <= 0 { return false }
            offset += sent
        }
        return true
    }

    /// Reads until EOF, error or `limit` bytes.
    static func receiveAll(_ fd: CInt, limit: Int = 8 << 20) -> [UInt8] {
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while result.count < limit {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            result += buffer[0..<count]
        }
        return result
    }

    /// One request with `Connection: close`.
    static func request(_ address: SocketAddress, _ method: String = "GET", _ path: String,
                        authorization: String? = nil) throws -> Response {
        let fd = try connect(address)
        defer { close(fd) }
        var text = "\(method) \(path) HTTP/1.1\r\nHost: stats\r\nConnection: close\r\n"
        if let authorization { text += "Authorization: \(authorization)\r\n" }
        if method == "POST" { text += "Content-Length: 0\r\n" }
        send(fd, Array((text + "\r\n").utf8))
        guard let response = parse(receiveAll(fd)) else { throw Failure(description: "no HTTP response to \(method) \(path)") }
        return response
    }

    static func parse(_ bytes: [UInt8]) -> Response? {
        let text = String(decoding: bytes, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { return nil }
        let lines = text[..<split.lowerBound].components(separatedBy: "\r\n")
        let statusFields = lines[0].split(separator: " ")
        guard statusFields.count >= 2, let status = Int(statusFields[1]) else { return nil }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        var body = String(text[split.upperBound...])
        if headers["transfer-encoding"]?.lowercased() == "chunked" { body = dechunk(body) }
        return Response(status: status, headers: headers, body: body)
    }

    /// A chunked body (HAProxy's stats page sends one) as its plain bytes.
    static func dechunk(_ body: String) -> String {
        var rest = Substring(body)
        var result = ""
        while let lineEnd = rest.range(of: "\r\n"), let size = Int(rest[..<lineEnd.lowerBound], radix: 16), size > 0 {
            let start = lineEnd.upperBound
            let utf8 = rest[start...].utf8
            guard utf8.count >= size else { break }
            let end = utf8.index(utf8.startIndex, offsetBy: size)
            result += String(rest[start..<end])
            rest = rest[end...].dropFirst(2)
        }
        return result
    }

    /// GET through the proxy to a whoami: the backend's identity ("I'm ID").
    static func whoami(_ address: SocketAddress) throws -> String {
        try request(address, "GET", "/").body.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// A real tool run to its end with its output in files; killed (by its pid) past `timeout`.
struct Tool {
    struct Result {
        var status: Int32
        var output: String
        var error: String
    }

    static func run(_ executable: String, _ arguments: [String], timeout: Double = 60) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let base = NSTemporaryDirectory() + "berth-stats-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        defer {
            try? FileManager.default.removeItem(atPath: base + ".out")
            try? FileManager.default.removeItem(atPath: base + ".err")
        }
        process.standardOutput = FileHandle(forWritingAtPath: base + ".out")
        process.standardError = FileHandle(forWritingAtPath: base + ".err")
        try process.run()
        let deadline = monotonicSeconds() + timeout
        while process.isRunning && monotonicSeconds() < deadline { usleep(20_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw HTTP.Failure(description: "\(executable) did not finish within \(timeout) s")
        }
        return Result(status: process.terminationStatus,
                      output: (try? String(contentsOfFile: base + ".out", encoding: .utf8)) ?? "",
                      error: (try? String(contentsOfFile: base + ".err", encoding: .utf8)) ?? "")
    }

    /// The first of `names` found on PATH or in the usual directories.
    static func find(_ names: [String]) -> String? {
        let directories = (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":").map(String.init)
            + ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"]
        for name in names {
            for directory in directories where access(directory + "/" + name, X_OK) == 0 {
                return directory + "/" + name
            }
        }
        return nil
    }

    /// `test-output/` at the package root (gitignored).
    static var outputDirectory: String {
        var root = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { root.deleteLastPathComponent() }
        let directory = root.appendingPathComponent("test-output").path
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return directory
    }
}
