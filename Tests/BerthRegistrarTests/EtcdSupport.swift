// A real etcd for the registrar's tests, and a small client of etcd's JSON gateway (/v3/...)
// used to read keys back independently of the code under test.
import BerthRegistrar
import BerthTestSupport
import Foundation
import Glibc
import NIOCore
import NIOHTTP1
import NIOPosix
import XCTest

/// `etcd` on random loopback ports with a temporary data dir; stopped by PID.
final class LocalEtcd: @unchecked Sendable {
    let clientPort: Int
    let peerPort: Int
    let directory: String
    private var process: SpawnedProcess?

    var endpoint: String { "127.0.0.1:\(clientPort)" }

    init() throws {
        guard access("/usr/bin/etcd", X_OK) == 0 else { throw FixtureFailure("etcd is not installed") }
        var template = Array("/tmp/berth-etcd-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw FixtureFailure("mkdtemp failed") }
        directory = String(cString: made)
        clientPort = try Self.freePort()
        peerPort = try Self.freePort()
        try start()
    }

    deinit { stop(removeData: true) }

    func start() throws {
        let peer = "http://127.0.0.1:\(peerPort)"
        let client = "http://127.0.0.1:\(clientPort)"
        let started = try SpawnedProcess("/usr/bin/etcd", [
            "--name", "test", "--data-dir", "\(directory)/data",
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", "test=\(peer)", "--log-level", "warn",
        ])
        process = started
        let ready = waitUntil(timeout: 20, interval: 0.05) {
            guard started.isRunning else { return true }
            return Self.healthy(port: clientPort)
        }
        guard ready != nil, started.isRunning else { throw FixtureFailure("etcd did not start: \(started.standardError.suffix(1500))") }
    }

    /// SIGKILL-free stop (SIGTERM by PID), optionally wiping the data dir.
    func stop(removeData: Bool = false) {
        process?.stop(grace: 5)
        process = nil
        if removeData { _ = try? SpawnedProcess.run("rm", ["-rf", "\(directory)/data"], timeout: 20) }
    }

    private static func healthy(port: Int) -> Bool {
        (try? SpawnedProcess.run("curl", ["-sf", "-m", "1", "http://127.0.0.1:\(port)/health"], timeout: 3).code) == 0
    }

    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw FixtureFailure("socket failed") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { raw -> Bool in
                bind(fd, raw, length) == 0 && getsockname(fd, raw, &length) == 0
            }
        }
        guard bound else { throw FixtureFailure("bind failed") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

/// etcd's JSON gateway, as a `RegistrationStore`: used to read keys in assertions, and as the
/// store of in-process registrars in these tests.
struct EtcdGateway: RegistrationStore {
    let port: Int

    struct Failure: Error, CustomStringConvertible { let description: String }

    func grantLease(ttl: Int64) async throws -> Int64 {
        let answer = try await call("/v3/lease/grant", ["TTL": ttl])
        guard let id = Self.integer(answer["ID"]) else { throw Failure(description: "grant: \(answer)") }
        return id
    }

    func keepAliveOnce(lease: Int64) async throws -> Int64 {
        let answer = try await call("/v3/lease/keepalive", ["ID": String(lease)])
        if answer["error"] != nil { return 0 }
        return Self.integer((answer["result"] as? [String: Any])?["TTL"]) ?? 0
    }

    func revokeLease(_ lease: Int64) async throws {
        _ = try await call("/v3/lease/revoke", ["ID": String(lease)])
    }

    func put(key: String, value: String, lease: Int64) async throws {
        _ = try await call("/v3/kv/put", ["key": Self.base64(key), "value": Self.base64(value), "lease": String(lease)])
    }

    func delete(key: String) async throws {
        _ = try await call("/v3/kv/deleterange", ["key": Self.base64(key)])
    }

    func get(prefix: String) async throws -> [String: String] {
        var end = Array(prefix.utf8)
        end[end.count - 1] += 1
        let answer = try await call("/v3/kv/range", ["key": Self.base64(prefix), "range_end": Data(end).base64EncodedString()])
        var result: [String: String] = [:]
        for kv in answer["kvs"] as? [[String: Any]] ?? [] {
            guard let keyText = kv["key"] as? String, let key = Data(base64Encoded: keyText) else { continue }
            let value = (kv["value"] as? String).flatMap { Data(base64Encoded: $0) } ?? Data()
            result[String(decoding: key, as: UTF8.self)] = String(decoding: value, as: UTF8.self)
        }
        return result
    }

    /// Lease of one key (0 = none).
    func lease(of key: String) async throws -> Int64 {
        let answer = try await call("/v3/kv/range", ["key": Self.base64(key)])
        return Self.integer((answer["kvs"] as? [[String: Any]])?.first?["lease"]) ?? 0
    }

    private static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    private static func integer(_ value: Any?) -> Int64? {
        if let text = value as? String { return Int64(text) }
        if let number = value as? NSNumber { return number.int64Value }
        return nil
    }

    private func call(_ path: String, _ body: [String: Any]) async throws -> [String: Any] {
        let payload = try JSONSerialization.data(withJSONObject: body)
        let port = self.port
        let data = try await Self.post(port: port, path: path, body: [UInt8](payload))
        guard let object = try JSONSerialization.jsonObject(with: Data(data)) as? [String: Any] else {
            throw Failure(description: "\(path): not a JSON object")
        }
        return object
    }

    private static func post(port: Int, path: String, body: [UInt8]) async throws -> [UInt8] {
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connectTimeout(.seconds(1))
            .connect(host: "127.0.0.1", port: port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: path)
            head.headers.add(name: "Host", value: "127.0.0.1")
            head.headers.add(name: "Content-Type", value: "application/json")
            head.headers.add(name: "Content-Length", value: String(body.count))
            head.headers.add(name: "Connection", value: "close")
            try await outbound.write(.head(head))
            try await outbound.write(.body(ByteBuffer(bytes: body)))
            try await outbound.write(.end(nil))
            var result: [UInt8] = []
            for try await part in inbound {
                if case .body(let buffer) = part { result += buffer.readableBytesView }
                if case .end = part { break }
            }
            return result
        }
    }
}

/// Polls an async condition every 20 ms until it holds or `timeout` passes: seconds taken or nil.
func eventually(timeout: Double, _ condition: () async throws -> Bool) async -> Double? {
    let start = monotonicSeconds()
    while true {
        if (try? await condition()) == true { return monotonicSeconds() - start }
        if monotonicSeconds() - start > timeout { return nil }
        try? await Task.sleep(for: .milliseconds(20))
    }
}

/// `eventually`, failing the test when the condition never held; the seconds it took.
@discardableResult
func assertEventually(timeout: Double, _ message: @autoclosure () -> String = "", file: StaticString = #filePath, line: UInt = #line,
                      _ condition: () async throws -> Bool) async -> Double? {
    let took = await eventually(timeout: timeout, condition)
    if took == nil { XCTFail("not within \(timeout) s. \(message())", file: file, line: line) }
    return took
}
