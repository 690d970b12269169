// Reading etcd back in the registrar's tests, through a client of its own (not the registrar's),
// and polling with deadlines.
import BerthEtcd
import BerthTestSupport
import Foundation
import XCTest

/// Keys as etcd holds them, read by a separate `EtcdClient`.
struct EtcdReader: Sendable {
    let client: EtcdClient

    init(_ etcd: EtcdFixture) throws {
        var configuration = EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(etcd.endpoints))
        configuration.requestTimeout = .seconds(1)
        client = try EtcdClient(configuration: configuration)
    }

    func get(prefix: String) async throws -> [String: String] {
        var result: [String: String] = [:]
        for keyValue in try await client.get(prefix: prefix).keyValues { result[keyValue.key] = keyValue.valueText }
        return result
    }

    /// The lease a key is attached to (0: none or no such key).
    func lease(of key: String) async throws -> Int64 { try await client.get(key: key)?.lease ?? 0 }

    func delete(key: String) async throws { _ = try await client.delete(key: key) }
}

extension EtcdFixture {
    /// Stops the only member (SIGTERM by PID), optionally loses its data, starts it again and
    /// waits until it answers.
    func restart(losingData: Bool) throws {
        let member = members[0]
        member.stop(hard: false)
        if losingData { try? FileManager.default.removeItem(atPath: member.dataDirectory) }
        try member.start()
        try waitHealthy(timeout: 20)
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

/// A real dockerd and a real etcd shared by one test class: `start()` in `class func setUp`,
/// `stop()` in `class func tearDown`; `require()` in a test skips it when they could not start.
final class DockerAndEtcd: @unchecked Sendable {
    private(set) var docker: DockerFixture?
    private(set) var etcd: EtcdFixture?
    private(set) var failure: String?

    func start() {
        if let reason = DockerFixture.available() {
            failure = reason
            return
        }
        do {
            etcd = try EtcdFixture()
            docker = try DockerFixture()
        } catch {
            failure = "\(error)"
        }
    }

    func stop() {
        docker?.stop()
        docker = nil
        etcd?.stop()
        etcd = nil
    }

    func require() throws -> (DockerFixture, EtcdFixture) {
        if let failure { throw XCTSkip("no real dockerd/etcd: \(failure)") }
        guard let docker, let etcd else { throw XCTSkip("fixtures missing") }
        return (docker, etcd)
    }
}
