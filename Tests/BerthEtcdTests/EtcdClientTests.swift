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

    /// Several prefixes on one watch stream (`--services`): etcd holds one stream with a
    /// watcher per prefix; each prefix's events arrive in order, none of another prefix's or
    /// of a key no prefix covers. The listing of 130 prefixes (two transactions) is one
    /// revision's.
    func testOneStreamWatchesSeveralPrefixes() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let client = try client(etcd.endpoints)
        defer { client.close() }
        let prefixes = (0..<130).map { String(format: "/s/%03d/", $0) }
        for index in stride(from: 0, to: 130, by: 13) { try await client.put(key: prefixes[index] + "k", value: "\(index)") }
        let unwatched = try await client.put(key: "/s/999/k", value: "x")
        let listing = try await client.get(prefixes: prefixes)
        XCTAssertEqual(listing.keyValues.map(\.key), stride(from: 0, to: 130, by: 13).map { prefixes[$0] + "k" })
        XCTAssertEqual(listing.revision, unwatched)

        let seen = Mutex<[String: [Int64]]>([:])
        let connected = Mutex(0)
        let watcher = Task {
            try await client.watch(prefixes: prefixes, fromRevision: listing.revision + 1,
                                   onConnected: { _ in connected.withLock { $0 += 1 } }) { batch in
                seen.withLock { seen in
                    for event in batch.events { seen[String(event.keyValue.key.prefix(7)), default: []].append(event.keyValue.modRevision) }
                }
            }
        }
        defer { watcher.cancel() }
        try await waitUntil("connected") { connected.withLock { $0 } == 1 }
        XCTAssertEqual(etcdMetric(etcd, "etcd_debugging_mvcc_watch_stream_total"), 1, "one stream for all the prefixes")
        XCTAssertEqual(etcdMetric(etcd, "etcd_debugging_mvcc_watcher_total"), 130, "a watcher per prefix")
        var expected: [String: [Int64]] = [:]
        for round in 0..<40 {
            let prefix = prefixes[(round * 37) % 130]
            expected[prefix, default: []].append(try await client.put(key: prefix + "k\(round % 3)", value: "\(round)"))
            try await client.put(key: "/s/999/k", value: "\(round)")
        }
        let removed = try await client.delete(prefix: prefixes[0])
        XCTAssertEqual(removed, 2, "k and k0")
        let deleted = try await client.get(prefix: "").revision
        expected[prefixes[0], default: []] += [deleted, deleted]
        try await waitUntil("every event") { seen.withLock { $0.values.reduce(0) { $0 + $1.count } } >= expected.values.reduce(0) { $0 + $1.count } }
        try await Task.sleep(for: .milliseconds(200))
        XCTAssertEqual(seen.withLock { $0 }, expected)
        XCTAssertEqual(connected.withLock { $0 }, 1, "established once, when every watch was created")
        // The stall check's read (for endpoints that answer no progress request): the newest
        // put of each prefix, nil for an empty one.
        let listed = Dictionary(grouping: try await client.get(prefixes: prefixes).keyValues) { String($0.key.prefix(7)) }
        let newest = try await client.newestPuts(of: prefixes)
        XCTAssertEqual(newest, prefixes.map { listed[$0]?.map(\.modRevision).max() })
        XCTAssertEqual(newest?.compactMap { $0 }.count, listed.count)
    }

    /// Through etcd's gRPC proxy, with every write made to etcd itself: the listing of
    /// several prefixes, one stream watching them all (the proxy numbers a stream's watches as
    /// etcd does), and the stall check's read, which the proxy must pass to etcd.
    func testSeveralPrefixesThroughTheGRPCProxy() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let port = try freeLoopbackPort()
        let proxy = try SpawnedProcess(EtcdFixture.etcdPath, ["grpc-proxy", "start", "--endpoints", "127.0.0.1:\(etcd.members[0].clientPort)",
                                                              "--listen-addr", "127.0.0.1:\(port)"])
        defer { proxy.stop() }
        let direct = try client(etcd.endpoints)
        defer { direct.close() }
        let proxied = try client("http://127.0.0.1:\(port)")
        defer { proxied.close() }
        let prefixes = ["/p/a/", "/p/b/", "/p/c/"]
        try await direct.put(key: "/p/b/1", value: "1")
        let before = try await direct.put(key: "/p/c/1", value: "1")
        var tries = 0
        while (try? await proxied.get(prefix: "/p/")) == nil, tries < 100 {  // until the proxy listens
            tries += 1
            try await Task.sleep(for: .milliseconds(100))
        }
        let listing = try await proxied.get(prefixes: prefixes)
        XCTAssertEqual(listing.keyValues.map(\.key), ["/p/b/1", "/p/c/1"])
        XCTAssertEqual(listing.revision, before)

        let seen = Mutex<[String]>([])
        let watcher = Task {
            try await proxied.watch(prefixes: prefixes, fromRevision: listing.revision + 1) { batch in
                seen.withLock { $0 += batch.events.map { "\($0.keyValue.key)=\($0.keyValue.valueText)" } }
            }
        }
        defer { watcher.cancel() }
        var expected: [String] = []
        for round in 0..<12 {
            let key = prefixes[round % 3] + "\(round % 2)"
            try await direct.put(key: key, value: "\(round)")
            try await direct.put(key: "/p/z/\(round)", value: "x")
            expected.append("\(key)=\(round)")
        }
        try await waitUntil("every event", timeout: 10) { seen.withLock { $0.count } >= expected.count }
        XCTAssertEqual(seen.withLock { $0 }.sorted(), expected.sorted())
        let newest = try await proxied.newestPuts(of: prefixes + ["/p/none/"])
        let latest = try await direct.get(prefixes: prefixes)
        XCTAssertEqual(newest, prefixes.map { prefix in latest.keyValues.filter { $0.key.hasPrefix(prefix) }.map(\.modRevision).max() } + [nil],
                       "the proxy answered the stall check's read from a stale cache, or not at all")
    }

    /// A gauge from the first member's /metrics.
    private func etcdMetric(_ etcd: EtcdFixture, _ name: String) -> Int? {
        guard let text = try? HTTPProbe.get(port: etcd.members[0].clientPort, path: "/metrics", timeout: 2) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.split(separator: " ").last ?? "").map { Int($0) }
        }
        return nil
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

    /// 3 members; the one the watch goes through is killed while keys of three prefixes (one
    /// stream) change every 10 ms: every revision arrives exactly once, in order, each under
    /// its prefix, resumed per prefix.
    func testWatchSurvivesTheLossOfItsMemberWithoutSkippingARevision() async throws {
        let etcd = try EtcdFixture(size: 3)
        defer { etcd.stop() }
        let watching = try client(etcd.endpoints)
        defer { watching.close() }
        let writer = try client([etcd.members[1], etcd.members[2]].map(\.clientURL).joined(separator: ","))
        defer { writer.close() }
        let start = try await writer.put(key: "/k/start", value: "0")
        let prefixes = ["/k/0/", "/k/1/", "/k/2/"]
        let revisions = Mutex<[String: [Int64]]>([:])
        let endpoints = Mutex<Set<String>>([])
        let watcher = Task {
            try await watching.watch(prefixes: prefixes, fromRevision: start + 1) { batch in
                endpoints.withLock { _ = $0.insert(batch.endpoint.description) }
                revisions.withLock { revisions in
                    for event in batch.events { revisions[String(event.keyValue.key.prefix(5)), default: []].append(event.keyValue.modRevision) }
                }
            }
        }
        defer { watcher.cancel() }
        var written: [Int64] = []
        for index in 0..<300 {
            if index == 100 { etcd.members[0].stop(hard: true) }
            written.append(try await writer.put(key: "/k/\(index % 3)/\(index % 7)", value: "\(index)"))
            try await Task.sleep(for: .milliseconds(10))
        }
        // A put retried after a lost answer (the election after the kill) takes two revisions:
        // compare with etcd's history, every revision from start + 1 to the last one written.
        let all: @Sendable () -> [Int64] = { revisions.withLock { $0.values.flatMap { $0 } } }
        try await waitUntil("every revision", timeout: 20) { all().count >= written.last! - start }
        XCTAssertEqual(all().sorted(), Array((start + 1)...written.last!), "revisions seen differ from etcd's history")
        for (prefix, seen) in revisions.withLock({ $0 }) {
            XCTAssertEqual(seen, seen.sorted(), "\(prefix): out of order")
        }
        XCTAssertEqual(Set(revisions.withLock { $0.keys }), Set(prefixes))
        XCTAssertTrue(Set(written).isSubset(of: Set(all())))
        XCTAssertGreaterThan(endpoints.withLock { $0.count }, 1, "the watch never moved to another member")
    }
}
