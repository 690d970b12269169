// A real etcd (Debian's etcd-server) for tests: one member or a cluster, on loopback, with
// temporary data directories and free ports, stopped by PID. Every wait has a deadline.
import Foundation
import Glibc

/// A fixture failure with a message fit for the test log.
public struct FixtureFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A port nobody listens on right now (bound to port 0 and released; fine for tests).
public func freeLoopbackPort(host: String = "127.0.0.1") throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw FixtureFailure("socket: errno \(errno)") }
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = 0
    inet_pton(AF_INET, host, &address.sin_addr)
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0 else { throw FixtureFailure("bind: errno \(errno)") }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// Runs a program to completion (bounded by `timeout` seconds) and returns its output.
@discardableResult
public func runProgram(_ path: String, _ arguments: [String], environment: [String: String] = [:],
                       input: String? = nil, timeout: Double = 30) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    var merged = ProcessInfo.processInfo.environment
    for (key, value) in environment { merged[key] = value }
    process.environment = merged
    let outputFile = FileManager.default.temporaryDirectory.appendingPathComponent("berth-run-\(UUID().uuidString)")
    _ = FileManager.default.createFile(atPath: outputFile.path, contents: nil)
    defer { try? FileManager.default.removeItem(at: outputFile) }
    let handle = try FileHandle(forWritingTo: outputFile)
    defer { try? handle.close() }
    process.standardOutput = handle
    process.standardError = handle
    if let input {
        let pipe = Pipe()
        process.standardInput = pipe
        try process.run()
        pipe.fileHandleForWriting.write(Data(input.utf8))
        try pipe.fileHandleForWriting.close()
    } else {
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }
    let deadline = Date().addingTimeInterval(timeout)
    while process.isRunning {
        if Date() > deadline {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw FixtureFailure("\(path) \(arguments.joined(separator: " ")) took more than \(timeout) s")
        }
        usleep(5_000)
    }
    let output = (try? String(contentsOf: outputFile, encoding: .utf8)) ?? ""
    return (process.terminationStatus, output)
}

/// One etcd member started by a test.
public final class EtcdMember: @unchecked Sendable {
    public let name: String
    public let clientPort: Int
    public let peerPort: Int
    public let dataDirectory: String
    public let logPath: String
    let arguments: [String]
    private var process: Process?
    private let lock = NSLock()

    public let secure: Bool
    public var clientURL: String { "\(secure ? "https" : "http")://127.0.0.1:\(clientPort)" }
    public var pid: Int32? { lock.withLock { process?.isRunning == true ? process?.processIdentifier : nil } }

    init(name: String, clientPort: Int, peerPort: Int, directory: String, cluster: String, token: String, tls: EtcdTLSFiles?) {
        self.name = name
        self.secure = tls != nil
        self.clientPort = clientPort
        self.peerPort = peerPort
        self.dataDirectory = "\(directory)/\(name).etcd"
        self.logPath = "\(directory)/\(name).log"
        let scheme = tls == nil ? "http" : "https"
        let security = tls.map {
            ["--cert-file", $0.serverCertificate, "--key-file", $0.serverKey, "--trusted-ca-file", $0.ca, "--client-cert-auth"]
        } ?? []
        self.arguments = security + [
            "--name", name, "--data-dir", dataDirectory,
            "--listen-client-urls", "\(scheme)://127.0.0.1:\(clientPort)",
            "--advertise-client-urls", "\(scheme)://127.0.0.1:\(clientPort)",
            "--listen-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-advertise-peer-urls", "http://127.0.0.1:\(peerPort)",
            "--initial-cluster", cluster, "--initial-cluster-token", token,
            "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
        ]
    }

    /// Starts (or restarts, keeping its data) the member.
    public func start() throws {
        try lock.withLock {
            guard process?.isRunning != true else { return }
            let created = Process()
            created.executableURL = URL(fileURLWithPath: EtcdFixture.etcdPath)
            created.arguments = arguments
            if !FileManager.default.fileExists(atPath: logPath) {
                _ = FileManager.default.createFile(atPath: logPath, contents: nil)
            }
            let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
            log.seekToEndOfFile()
            created.standardOutput = log
            created.standardError = log
            created.standardInput = FileHandle.nullDevice
            try created.run()
            try? log.close()
            process = created
        }
    }

    /// Stops the member by PID: SIGKILL when `hard`, else SIGTERM; waits until it is gone.
    public func stop(hard: Bool = true) {
        let running = lock.withLock { () -> Process? in
            defer { process = nil }
            return process
        }
        guard let running, running.isRunning else { return }
        kill(running.processIdentifier, hard ? SIGKILL : SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while running.isRunning && Date() < deadline { usleep(2_000) }
        if running.isRunning { kill(running.processIdentifier, SIGKILL) }
        running.waitUntilExit()
    }
}

/// An etcd cluster of one or more members on loopback.
public final class EtcdFixture: @unchecked Sendable {
    public static let etcdPath = "/usr/bin/etcd"
    public static let etcdctlPath = "/usr/bin/etcdctl"
    public let members: [EtcdMember]
    public let directory: String

    /// Comma-separated client URLs of every member.
    public var endpoints: String { members.map(\.clientURL).joined(separator: ",") }

    /// Starts `size` members and waits until the cluster answers.
    /// Client certificates and CA, when the members serve https (`tls: true`).
    public private(set) var tls: EtcdTLSFiles?

    public init(size: Int = 1, tls wantsTLS: Bool = false) throws {
        guard FileManager.default.isExecutableFile(atPath: Self.etcdPath) else {
            throw FixtureFailure("\(Self.etcdPath) is missing: apt-get install etcd-server etcd-client")
        }
        let directory = NSTemporaryDirectory() + "berth-etcd-\(UUID().uuidString.prefix(8))"
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var ports: [(Int, Int)] = []
        for _ in 0..<size { ports.append((try freeLoopbackPort(), try freeLoopbackPort())) }
        let cluster = ports.enumerated().map { "m\($0.offset)=http://127.0.0.1:\($0.element.1)" }.joined(separator: ",")
        let token = "berth-test-\(UUID().uuidString.prefix(8))"
        let tls = wantsTLS ? try EtcdTLSFiles.generate(in: directory) : nil
        self.tls = tls
        members = ports.enumerated().map {
            EtcdMember(name: "m\($0.offset)", clientPort: $0.element.0, peerPort: $0.element.1,
                       directory: directory, cluster: cluster, token: token, tls: tls)
        }
        do {
            for member in members { try member.start() }
            try waitHealthy(timeout: 30)
        } catch {
            stop()
            throw error
        }
    }

    deinit { stop() }

    /// Stops every member and removes the data.
    public func stop() {
        for member in members { member.stop() }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Waits until every running member reports healthy.
    public func waitHealthy(timeout: Double = 20) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var last = ""
        while Date() < deadline {
            let running = members.filter { $0.pid != nil }.map(\.clientURL).joined(separator: ",")
            if let result = try? runProgram(Self.etcdctlPath, ["--endpoints", running, "--command-timeout=2s"] + tlsArguments + ["endpoint", "health"], timeout: 5) {
                if result.status == 0 { return }
                last = result.output
            }
            usleep(100_000)
        }
        throw FixtureFailure("etcd did not become healthy in \(timeout) s: \(last)\nlog: \(members.first.map { (try? String(contentsOfFile: $0.logPath, encoding: .utf8))?.suffix(2000) ?? "" } ?? "")")
    }

    var tlsArguments: [String] {
        tls.map { ["--cacert", $0.ca, "--cert", $0.clientCertificate, "--key", $0.clientKey] } ?? []
    }

    /// Runs etcdctl against the running members (or `endpoints`); throws on a non-zero exit.
    @discardableResult
    public func etcdctl(_ arguments: [String], endpoints: String? = nil, user: String? = nil, input: String? = nil) throws -> String {
        let running = endpoints ?? members.filter { $0.pid != nil }.map(\.clientURL).joined(separator: ",")
        var full = ["--endpoints", running, "--command-timeout=5s"] + tlsArguments
        if let user { full += ["--user", user] }
        let result = try runProgram(Self.etcdctlPath, full + arguments, input: input, timeout: 30)
        guard result.status == 0 else {
            throw FixtureFailure("etcdctl \(arguments.joined(separator: " ")) failed: \(result.output)")
        }
        return result.output
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
public struct EtcdTLSFiles: Sendable {
    public let ca: String
    public let serverCertificate: String
    public let serverKey: String
    public let clientCertificate: String
    public let clientKey: String

    static func generate(in directory: String) throws -> EtcdTLSFiles {
        let files = EtcdTLSFiles(ca: "\(directory)/ca.crt", serverCertificate: "\(directory)/server.crt", serverKey: "\(directory)/server.key",
                                 clientCertificate: "\(directory)/client.crt", clientKey: "\(directory)/client.key")
        let script = """
            set -e
            cd '\(directory)'
            openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=berth-test-ca 2>/dev/null
            printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth,clientAuth\\n' > server.ext
            openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1 2>/dev/null
            openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile server.ext 2>/dev/null
            printf 'extendedKeyUsage=clientAuth\\n' > client.ext
            openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=root 2>/dev/null
            openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 2 -extfile client.ext 2>/dev/null
            """
        let result = try runProgram("/bin/sh", ["-c", script], timeout: 60)
        guard result.status == 0 else { throw FixtureFailure("openssl: \(result.output)") }
        return files
    }
}
