import BerthTestSupport
import Foundation
import Synchronization
import XCTest
@testable import BerthEtcd

/// The client against a real etcd (Debian's etcd-server) on loopback.
final class EtcdClientTests: XCTestCase {
    func client(_ endpoints: String, credentials: EtcdConfiguration.Credentials? = nil) throws -> EtcdClient {
        var configuration = EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(endpoints), credentials: credentials)
        configuration.requestTimeout = .seconds(3)
        configuration.watchProgressInterval = .seconds(1)
        return try EtcdClient(configuration: configuration)
    }

    func testPutGetDeleteAndPrefixRange() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let first = try await client.put(key: "/t/a", value: "1")
        let second = try await client.put(key: "/t/b", value: "2")
        try await client.put(key: "/u/c", value: "3")
        XCTAssertEqual(second, first + 1)
        let range = try await client.get(prefix: "/t/")
        XCTAssertEqual(range.keyValues.map(\.key), ["/t/a", "/t/b"])
        XCTAssertEqual(range.keyValues.map(\.valueText), ["1", "2"])
        XCTAssertEqual(range.revision, second + 1)
        let single = try await client.get(key: "/t/b")
        XCTAssertEqual(single?.valueText, "2")
        let deleted = try await client.delete(prefix: "/t/")
        XCTAssertEqual(deleted, 2)
        let missing = try await client.get(key: "/t/a")
        XCTAssertNil(missing)
        // etcdctl sees what the client wrote.
        XCTAssertTrue(try etcd.etcdctl(["get", "/u/c", "--print-value-only"]).contains("3"))
    }

    /// `get(keys:)` reads exactly the keys asked for, over more than one transaction (128
    /// operations each), leaving out absent ones and never the neighbours under the prefix.
    func testGetKeysReadsExactlyThoseKeysAcrossTransactions() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        for batch in stride(from: 0, to: 300, by: 100) {
            try await client.putAll((batch..<batch + 100).map { (key: "/k/\($0)", value: Array("v\($0)".utf8)) })
        }
        let asked = stride(from: 0, to: 300, by: 2).map { "/k/\($0)" } + ["/k/absent", "/k/1000"]
        let found = try await client.get(keys: asked)
        XCTAssertEqual(found.count, 150)
        XCTAssertEqual(Set(found.map(\.key)), Set(stride(from: 0, to: 300, by: 2).map { "/k/\($0)" }))
        XCTAssertTrue(found.allSatisfy { $0.valueText == "v" + $0.key.dropFirst(3) })
        let none = try await client.get(keys: [])
        XCTAssertTrue(none.isEmpty)
    }

    func testLeaseKeysGoWithTheLease() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let lease = try await client.grantLease(ttl: 30)
        try await client.put(key: "/l/a", value: "x", lease: lease)
        let stored = try await client.get(key: "/l/a")
        XCTAssertEqual(stored?.lease, lease)
        let ttl = try await client.keepAliveOnce(lease: lease)
        XCTAssertGreaterThan(ttl, 25)
        try await client.revokeLease(lease)
        let gone = try await client.get(key: "/l/a")
        XCTAssertNil(gone)
        let renewed = try await client.keepAliveOnce(lease: lease)
        XCTAssertEqual(renewed, 0, "a revoked lease renews to TTL 0")
        try await client.revokeLease(lease)  // twice: not an error
    }

    func testWatchDeliversEveryChangeInOrderWithPreviousValues() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let start = try await client.put(key: "/w/a", value: "0")
        let seen = Mutex<[WatchEvent]>([])
        let watcher = Task {
            try await client.watch(prefix: "/w/", fromRevision: start + 1) { batch in
                seen.withLock { $0.append(contentsOf: batch.events) }
            }
        }
        defer { watcher.cancel() }
        for index in 1...20 { try await client.put(key: "/w/a", value: "\(index)") }
        try await client.delete(key: "/w/a")
        try await client.put(key: "/other", value: "x")
        try await waitUntil("21 events") { seen.withLock { $0.count } >= 21 }
        let events = seen.withLock { $0 }
        XCTAssertEqual(events.count, 21)
        XCTAssertEqual(events.prefix(20).map(\.keyValue.valueText), (1...20).map(String.init))
        XCTAssertEqual(events.prefix(20).map { $0.previous?.valueText }, (0..<20).map(String.init))
        XCTAssertEqual(events.last?.kind, .delete)
        XCTAssertEqual(events.map(\.keyValue.modRevision), Array((start + 1)...(start + 21)))
    }

    func testFailsOverToTheNextEndpoint() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let dead = try freeLoopbackPort()
        let client = try client("http://127.0.0.1:\(dead),\(etcd.endpoints)")
        defer { client.close() }
        try await client.put(key: "/f", value: "1")
        XCTAssertEqual(client.status.endpoint, etcd.members[0].clientURL)
        XCTAssertTrue(client.status.connected)
        XCTAssertEqual(client.status.failovers, 1)
    }

    /// A call its caller gives up on (a task cancelled by the caller's own deadline, as the
    /// registrar's 2 s store timeout does) ends with `CancellationError` and leaves the
    /// connection to etcd alone: it is not a transport failure. Dropping the connection there
    /// failed every other call and stream on it, and under a slow etcd a fleet's registrars
    /// reconnected in a storm.
    func testACallItsCallerCancelsKeepsTheConnection() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let value = [UInt8](repeating: UInt8(ascii: "v"), count: 2_048)
        for batch in stride(from: 0, to: 2_000, by: 100) {
            try await client.putAll((batch..<batch + 100).map { (key: "/c/\($0)", value: value) })
        }
        var cancelledMidway = 0
        for attempt in 0..<40 {
            let call = Task { try await client.get(prefix: "/c/") }
            try await Task.sleep(for: .microseconds(200 + 100 * (attempt % 20)))
            call.cancel()
            do {
                _ = try await call.value
            } catch is CancellationError {
                cancelledMidway += 1
            } catch {
                XCTFail("attempt \(attempt): a cancelled call threw \(error), not CancellationError")
            }
        }
        XCTAssertGreaterThan(cancelledMidway, 0, "no call was cancelled before its answer: the test proves nothing")
        XCTAssertEqual(client.status.failovers, 0, "cancelled calls dropped the connection")
        XCTAssertTrue(client.status.connected)
        let listing = try await client.get(prefix: "/c/")
        XCTAssertEqual(listing.keyValues.count, 2_000)
    }

    func testAllEndpointsDownIsAClearErrorNotAHang() async throws {
        let client = try client("127.0.0.1:\(try freeLoopbackPort()),127.0.0.1:\(try freeLoopbackPort())")
        defer { client.close() }
        let started = ContinuousClock.now
        do {
            try await client.put(key: "/x", value: "1")
            XCTFail("put succeeded with no etcd")
        } catch let error as EtcdError {
            guard case .unavailable(let reason) = error else { return XCTFail("\(error)") }
            XCTAssertTrue(reason.contains("Put"), reason)
        }
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(15))
    }

    func testAuthWrongPasswordIsAnErrorAndTheRightOneWorks() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        try etcd.etcdctl(["user", "add", "root", "--new-user-password=secret", "--interactive=false"])
        try etcd.etcdctl(["user", "grant-role", "root", "root"])
        try etcd.etcdctl(["auth", "enable"])
        let wrong = try client(etcd.endpoints, credentials: .init(username: "root", password: "nope"))
        defer { wrong.close() }
        do {
            _ = try await wrong.get(prefix: "/")
            XCTFail("a wrong password was accepted")
        } catch let error as EtcdError {
            XCTAssertTrue("\(error)".contains("authentication failed"), "\(error)")
        }
        let anonymous = try client(etcd.endpoints)
        defer { anonymous.close() }
        do {
            _ = try await anonymous.get(prefix: "/")
            XCTFail("no credentials were accepted")
        } catch let error as EtcdError {
            guard case .authenticationFailed = error else { return XCTFail("\(error)") }
        }
        let right = try client(etcd.endpoints, credentials: .init(username: "root", password: "secret"))
        defer { right.close() }
        try await right.put(key: "/auth", value: "ok")
        let read = try await right.get(key: "/auth")
        XCTAssertEqual(read?.valueText, "ok")
    }

    func testTLSWithCAAndClientCertificate() async throws {
        let etcd = try EtcdFixture(tls: true)
        defer { etcd.stop() }
        let files = try XCTUnwrap(etcd.tls)
        var configuration = EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(etcd.endpoints),
                                              tls: .init(caFile: files.ca, certificateFile: files.clientCertificate, keyFile: files.clientKey))
        configuration.requestTimeout = .seconds(3)
        let client = try EtcdClient(configuration: configuration)
        defer { client.close() }
        XCTAssertTrue(etcd.endpoints.hasPrefix("https://"))
        try await client.put(key: "/tls", value: "ok")
        let read = try await client.get(key: "/tls")
        XCTAssertEqual(read?.valueText, "ok")

        // Without a client certificate the server refuses the handshake: a clear error, no hang.
        var anonymous = configuration
        anonymous.tls = .init(caFile: files.ca)
        let refused = try EtcdClient(configuration: anonymous)
        defer { refused.close() }
        do {
            _ = try await refused.get(key: "/tls")
            XCTFail("etcd accepted a client without a certificate")
        } catch let error as EtcdError {
            guard case .unavailable = error else { return XCTFail("\(error)") }
        }
        // A missing file is a configuration error at once.
        var missing = configuration
        missing.tls = .init(caFile: "/nonexistent/ca.crt")
        XCTAssertThrowsError(try EtcdClient(configuration: missing)) { error in
            XCTAssertTrue("\(error)".contains("cannot read"), "\(error)")
        }
    }

    func testWatchFromACompactedRevisionThrowsCompacted() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let first = try await client.put(key: "/c/a", value: "1")
        var last = first
        for index in 0..<5 { last = try await client.put(key: "/c/a", value: "\(index)") }
        try await client.compact(revision: last)
        do {
            try await client.watch(prefix: "/c/", fromRevision: first) { _ in }
            XCTFail("the watch returned")
        } catch let error as EtcdError {
            XCTAssertEqual(error, .compacted(last))
        }
    }

    /// 3 members; the one the watch goes through is killed while keys change every 10 ms:
    /// every revision arrives exactly once, in order.
    func testWatchSurvivesTheLossOfItsMemberWithoutSkippingARevision() async throws {
        let etcd = try EtcdFixture(size: 3)
        defer { etcd.stop() }
        let watching = try client(etcd.endpoints)
        defer { watching.close() }
        let writer = try client([etcd.members[1], etcd.members[2]].map(\.clientURL).joined(separator: ","))
        defer { writer.close() }
        let start = try await writer.put(key: "/k/start", value: "0")
        let revisions = Mutex<[Int64]>([])
        let endpoints = Mutex<Set<String>>([])
        let watcher = Task {
            try await watching.watch(prefix: "/k/", fromRevision: start + 1) { batch in
                endpoints.withLock { _ = $0.insert(batch.endpoint.description) }
                revisions.withLock { $0.append(contentsOf: batch.events.map(\.keyValue.modRevision)) }
            }
        }
        defer { watcher.cancel() }
        var written: [Int64] = []
        for index in 0..<300 {
            if index == 100 { etcd.members[0].stop(hard: true) }
            written.append(try await writer.put(key: "/k/\(index % 7)", value: "\(index)"))
            try await Task.sleep(for: .milliseconds(10))
        }
        // A put retried after a lost answer (the election after the kill) takes two revisions:
        // compare with etcd's history, every revision from start + 1 to the last one written.
        let expected = Array((start + 1)...written.last!)
        try await waitUntil("every revision", timeout: 20) { revisions.withLock { $0.last ?? 0 } >= written.last! }
        XCTAssertEqual(revisions.withLock { $0 }, expected, "revisions seen differ from etcd's history")
        XCTAssertTrue(Set(written).isSubset(of: Set(expected)))
        XCTAssertGreaterThan(endpoints.withLock { $0.count }, 1, "the watch never moved to another member")
    }
}
