import BerthEngine
import BerthEtcd
import Foundation
import Glibc

/// An etcd started by `berth dev` as a child: a temporary data directory, free loopback ports,
/// stopped by its PID and the directory removed by `stop()`.
final class DevEtcd: @unchecked Sendable {
    let clientURL: String
    let directory: String
    private let process: Process

    /// Starts `binary` and waits (up to 20 s) until it answers a request.
    init(binary: String) throws {
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw ValidationErrorText("\(binary) is missing: apt-get install etcd-server (or pass --etcd-binary)")
        }
        // Ports first: nothing to clean up if they fail.
        let clientPort = try Self.freePort(), peerPort = try Self.freePort()
        var template = Array("/tmp/berth-dev.XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw ValidationErrorText("mkdtemp: errno \(errno)")
        }
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        clientURL = "http://127.0.0.1:\(clientPort)"
        let peerURL = "http://127.0.0.1:\(peerPort)"
        process = Process()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = [
            "--name", "berth-dev", "--data-dir", "\(directory)/data",
            "--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
            "--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
            "--initial-cluster", "berth-dev=\(peerURL)", "--logger", "zap", "--log-outputs", "\(directory)/etcd.log",
        ]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do {
            try process.run()
            try waitUntilServing()
        } catch {
            stop()
            throw error
        }
    }

    private func waitUntilServing() throws {
        var configuration = EtcdConfiguration(endpoints: [try EtcdEndpoint.parse(clientURL)])
        configuration.requestTimeout = .seconds(1)
        let client = try EtcdClient(configuration: configuration)
        defer { client.close() }
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            guard process.isRunning else {
                throw ValidationErrorText("etcd exited at start-up (status \(process.terminationStatus)); see \(directory)/etcd.log")
            }
            let answered = (try? blockingAwait { () async throws -> Bool in
                _ = try await client.get(key: "/")
                return true
            }) ?? false
            if answered { return }
            usleep(100_000)
        }
        throw ValidationErrorText("etcd did not answer within 20 s; see \(directory)/etcd.log")
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) and removes its directory.
    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            let deadline = Date().addingTimeInterval(5)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// A loopback port free a moment ago.
    static func freePort() throws -> Int {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        defer { socket.close() }
        return Int(try Sockets.localAddress(socket.raw).port)
    }
}

/// A runtime failure of a command, shown as one line.
struct ValidationErrorText: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
