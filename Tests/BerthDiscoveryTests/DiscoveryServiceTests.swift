import BerthEngine
@testable import BerthRegistry
import BerthSystem
import BerthEtcd
import BerthHealth
import BerthTestSupport
import BerthWhoami
import Foundation
import Synchronization
import XCTest
@testable import BerthDiscovery

/// Discovery against a real etcd: the watch feeds the catalog, the catalog the engine.
final class DiscoveryServiceTests: XCTestCase {
    /// A running discovery with its proxy, stopped by `stop()`.
    final class Running: @unchecked Sendable {
        let client: EtcdClient
        let router: HealthRouter
        let service: DiscoveryService
        let task: Task<Void, Never>

        init(endpoints: String, linger: Int64 = 0, defaultListen: UInt16? = nil, listenRetry: Duration = .seconds(5)) throws {
            var configuration = EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(endpoints))
            configuration.requestTimeout = .seconds(2)
            configuration.watchProgressInterval = .seconds(1)
            configuration.backoff = .init(initial: .milliseconds(20), maximum: .milliseconds(500))
            client = try EtcdClient(configuration: configuration)
            var engine = EngineConfiguration()
            engine.workers = 1
            router = try HealthRouter.make(configuration: engine, policy: HealthPolicy(), alwaysCheck: true)
            var settings = DiscoverySettings(
                catalog: Catalog.Options(defaultListen: defaultListen, linger: linger),
                bind: try SocketAddress(parsing: "127.0.0.1:0"),
                defaults: FrontendSettings(connectTimeout: 1_000))
            settings.listenRetryInterval = listenRetry
            let service = DiscoveryService(client: client, router: router, settings: settings)
            self.service = service
            task = Task { try? await service.run() }
        }

        func stop() {
            task.cancel()
            client.close()
            router.shutdown(drainTimeout: 0)
        }
    }

    func whoami(_ identity: String) throws -> WhoamiServer {
        try WhoamiServer(listen: try SocketAddress(parsing: "127.0.0.1:0"), identity: identity)
    }

    func record(_ server: WhoamiServer, listen: Int) -> String {
        "{\"host\":\"127.0.0.1\",\"port\":\(server.address.port),\"listen\":\(listen)}"
    }

    /// Waits until `port` answers with a body containing `text`.
    func waitForAnswer(port: Int, containing text: String, timeout: Double = 5) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var last = ""
        while Date() < deadline {
            last = (try? HTTPProbe.get(port: port, timeout: 1)) ?? "no answer"
            if last.contains(text) { return }
            usleep(5_000)
        }
        XCTFail("port \(port) never answered '\(text)'; last: \(last.prefix(80))")
    }

    func testAPutBecomesRoutableAndADeleteStopsNewConnections() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let one = try whoami("one"), two = try whoami("two")
        defer { one.stop(); two.stop() }
        let running = try Running(endpoints: etcd.endpoints)
        defer { running.stop() }
        let listen = try freeLoopbackPort()
        try etcd.etcdctl(["put", "/backends/whoami/a", record(one, listen: listen)])
        try waitForAnswer(port: listen, containing: "one")
        try etcd.etcdctl(["put", "/backends/whoami/b", record(two, listen: listen)])
        try waitForAnswer(port: listen, containing: "two")
        var answers: [String] = []
        for _ in 0..<4 { answers.append(try HTTPProbe.get(port: listen).contains("one") ? "one" : "two") }
        XCTAssertEqual(Set(answers), ["one", "two"])
        XCTAssertNotEqual(answers[0], answers[1], "round-robin alternates: \(answers)")
        try etcd.etcdctl(["del", "/backends/whoami/a"])
        try await waitUntil("the delete applied") { !running.service.catalog.services["whoami", default: .init()].instances.keys.contains("a") }
        for _ in 0..<6 { XCTAssertTrue(try HTTPProbe.get(port: listen).contains("two")) }
        try etcd.etcdctl(["del", "/backends/whoami/b"])
        try await waitUntil("the listener closed (linger 0)", timeout: 5) { !HTTPProbe.isListening(port: listen) }
    }

    /// The timer sleeps while nothing waits on the clock, and is woken when something does: a
    /// listener to retry (its port was taken), then a service lingering after its last
    /// instance went (it closes no sooner than its linger, and does close).
    func testTheTimerWakesForAListenerToRetryAndALingeringService() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let backend = try whoami("backend")
        defer { backend.stop() }
        let running = try Running(endpoints: etcd.endpoints, linger: 3_000, listenRetry: .seconds(1))
        defer { running.stop() }
        try await Task.sleep(for: .milliseconds(500))  // listed, idle: the timer asleep
        let listen = try freeLoopbackPort()
        let occupant = try SilentListener(host: "127.0.0.1", port: listen)  // no SO_REUSEPORT: the port is taken
        defer { occupant.stop() }  // (stopped below; again here if the test fails before)
        try etcd.etcdctl(["put", "/backends/late/a", record(backend, listen: listen)])
        try await waitUntil("the listener failure", timeout: 5) { !running.service.status.listenerFailures.isEmpty }
        try await Task.sleep(for: .milliseconds(1_500))  // a retry or more, failing
        occupant.stop()
        try waitForAnswer(port: listen, containing: "backend", timeout: 8)
        XCTAssertTrue(running.service.status.listenerFailures.isEmpty)

        let deleted = Date()
        try etcd.etcdctl(["del", "/backends/late/a"])
        try await waitUntil("the listener closed after its linger", timeout: 10) { !HTTPProbe.isListening(port: listen) }
        XCTAssertGreaterThan(Date().timeIntervalSince(deleted), 2.5, "closed before its 3 s linger")
    }

    func testSeedAndRegistratorLayoutsWrittenWithEtcdctl() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let one = try whoami("one"), two = try whoami("two")
        defer { one.stop(); two.stop() }
        let registratorListen = UInt16(try freeLoopbackPort())
        let running = try Running(endpoints: etcd.endpoints, defaultListen: registratorListen)
        defer { running.stop() }
        // The seed: HOST:PORT values and a port key.
        let seedListen = try freeLoopbackPort()
        try etcd.etcdctl(["put", "/backends/seed/c1", "127.0.0.1:\(one.address.port)"])
        try etcd.etcdctl(["put", "/backends/seed/c2", "127.0.0.1:\(two.address.port)"])
        try etcd.etcdctl(["put", "/backends/seed/port", "\(seedListen)"])
        try waitForAnswer(port: seedListen, containing: "one")
        try waitForAnswer(port: seedListen, containing: "two")
        // registrator: HOST:PORT values, listen port from _config (or --default-listen).
        let configured = try freeLoopbackPort()
        try etcd.etcdctl(["put", "/backends/_config/jwilder%2Fwhoami", "{\"listen\":\(configured)}"])
        try etcd.etcdctl(["put", "/backends/jwilder%2Fwhoami/host1:whoami:8000", "127.0.0.1:\(two.address.port)"])
        try waitForAnswer(port: configured, containing: "two")
        try etcd.etcdctl(["put", "/backends/plain/host1:plain:80", "127.0.0.1:\(one.address.port)"])
        try waitForAnswer(port: Int(registratorListen), containing: "one")
        XCTAssertNotNil(running.service.catalog.services["jwilder/whoami"])
    }

    /// The member discovery watches through is killed while keys change every 10 ms: every
    /// revision is applied once, in order, and the final catalog equals etcd's.
    func testWatchedMemberKilledWhileKeysChange() async throws {
        let etcd = try EtcdFixture(size: 3)
        defer { etcd.stop() }
        let backend = try whoami("b")
        defer { backend.stop() }
        let running = try Running(endpoints: etcd.endpoints)
        defer { running.stop() }
        let writer = try EtcdClient(configuration: EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(
            "\(etcd.members[1].clientURL),\(etcd.members[2].clientURL)")))
        defer { writer.close() }
        let listen = try freeLoopbackPort()
        let start = try await writer.put(key: "/backends/svc/0", value: record(backend, listen: listen))
        try await waitUntil("the first instance") { running.service.status.appliedRevision >= start }
        var last = start
        for index in 1...300 {
            if index == 100 { etcd.members[0].stop(hard: true) }
            let key = "/backends/svc/\(index % 13)"
            last = index % 5 == 0 ? max(last, try await writer.put(key: key, value: Array("not a record".utf8)))
                : try await writer.put(key: key, value: record(backend, listen: listen))
            try await Task.sleep(for: .milliseconds(10))
        }
        last = try await writer.get(prefix: "/backends/").revision
        try await waitUntil("the last revision", timeout: 20) { running.service.status.appliedRevision >= last }
        let applied = running.service.appliedRevisions()
        XCTAssertEqual(applied.filter { $0 > start }, Array((start + 1)...last), "applied revisions skip or repeat")
        var expected = Catalog()
        let listing = try await writer.get(prefix: "/backends/")
        _ = expected.reset(entries: listing.keyValues.map { ($0.key, $0.value) }, revision: listing.revision)
        XCTAssertEqual(running.service.catalog.services, expected.services)
        XCTAssertGreaterThan(running.service.status.failovers, 0)
        XCTAssertEqual(running.router.engine.statistics().revision, UInt64(last))
        XCTAssertTrue(try HTTPProbe.get(port: listen).contains("b"))
    }

    /// Discovery's only endpoint is down for 30 s under load: existing backends keep serving
    /// every connection; changes made meanwhile (through another member), a compaction past
    /// discovery's revision among them, are applied within 2 s of its return.
    func testCutOffFromEtcdForThirtySecondsUnderLoad() async throws {
        let etcd = try EtcdFixture(size: 3)
        defer { etcd.stop() }
        let one = try whoami("one"), two = try whoami("two"), three = try whoami("three")
        defer { one.stop(); two.stop(); three.stop() }
        let running = try Running(endpoints: etcd.members[0].clientURL)
        defer { running.stop() }
        let writer = try EtcdClient(configuration: EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(
            "\(etcd.members[1].clientURL),\(etcd.members[2].clientURL)")))
        defer { writer.close() }
        let listen = try freeLoopbackPort()
        try await writer.put(key: "/backends/web/one", value: record(one, listen: listen))
        try await writer.put(key: "/backends/web/two", value: record(two, listen: listen))
        try waitForAnswer(port: listen, containing: "two")

        etcd.members[0].stop(hard: true)
        let outage = Double(ProcessInfo.processInfo.environment["BERTH_OUTAGE_SECONDS"] ?? "30") ?? 30
        let deadline = Date().addingTimeInterval(outage)
        var requests = 0, failures: [String] = []
        var changed = false
        while Date() < deadline {
            do {
                let body = try HTTPProbe.get(port: listen, timeout: 2)
                if !(body.contains("one") || body.contains("two")) { failures.append("unexpected answer: \(body.prefix(40))") }
            } catch {
                failures.append("\(error)")
            }
            requests += 1
            if !changed && Date() > deadline.addingTimeInterval(-outage / 2) {
                // Made while discovery is cut off: a new backend, one gone, then history compacted.
                try await writer.put(key: "/backends/web/three", value: record(three, listen: listen))
                try await writer.delete(key: "/backends/web/one")
                let revision = try await writer.put(key: "/backends/other/x", value: "garbage")
                try await writer.compact(revision: revision)
                changed = true
            }
            usleep(2_000)
        }
        XCTAssertEqual(failures, [], "\(failures.count) of \(requests) requests failed while etcd was away")
        XCTAssertGreaterThan(requests, 100)
        XCTAssertFalse(running.service.status.connected)

        try etcd.members[0].start()
        let back = Date()
        try await waitUntil("the changes applied", timeout: 15) {
            let instances = running.service.catalog.services["web"]?.instances.keys.sorted() ?? []
            return instances == ["three", "two"]
        }
        let delay = Date().timeIntervalSince(back)
        XCTAssertLessThan(delay, 2 + 5, "applied \(delay) s after the member was started (it needs a few seconds to rejoin)")
        print("changes applied \(String(format: "%.2f", delay)) s after the member restarted; \(requests) requests, 0 failed during the outage")
        XCTAssertGreaterThanOrEqual(running.service.status.listings, 2, "the compaction forced a new listing")
        var expected = Catalog()
        let listing = try await writer.get(prefix: "/backends/")
        _ = expected.reset(entries: listing.keyValues.map { ($0.key, $0.value) }, revision: listing.revision)
        try await waitUntil("the catalog equals etcd's", timeout: 5) { running.service.catalog.services == expected.services }
        var answers = Set<String>()
        for _ in 0..<6 { answers.insert(try HTTPProbe.get(port: listen)) }
        XCTAssertTrue(answers.allSatisfy { !$0.contains("one") }, "the deleted backend still answers")
    }

    /// 100,000 random values put through etcd (in transactions): none crashes discovery, and
    /// every malformed one is counted.
    func testHundredThousandRandomValues() async throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let running = try Running(endpoints: etcd.endpoints)
        defer { running.stop() }
        let writer = try EtcdClient(configuration: EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(etcd.endpoints)))
        defer { writer.close() }
        var generator = SystemRandomNumberGenerator()
        var malformed = 0
        let total = Int(ProcessInfo.processInfo.environment["BERTH_FUZZ_VALUES"] ?? "100000") ?? 100_000
        var batch: [(key: String, value: [UInt8])] = []
        var last: Int64 = 0
        for index in 0..<total {
            let value = RandomValues.next(&generator)
            if (try? InstanceRecord.parse(value)) == nil { malformed += 1 }
            batch.append((key: "/backends/fuzz\(index % 97)/i\(index)", value: value))
            if batch.count == 128 || index == total - 1 {
                last = try await writer.putAll(batch)
                batch.removeAll(keepingCapacity: true)
            }
        }
        try await waitUntil("every value applied", timeout: 120) { running.service.status.appliedRevision >= last }
        // Every malformed key is known as such (a re-list after a broken watch counts values
        // again in the total, so the keys are the exact measure).
        XCTAssertEqual(running.service.catalog.malformedKeys.count, malformed)
        XCTAssertGreaterThanOrEqual(Int(running.service.status.skippedValues), malformed)
        XCTAssertGreaterThan(malformed, total / 2)
        print("\(total) random values: \(malformed) malformed, all counted")
    }
}

/// Random registry values: bytes, and mutated records and HOST:PORT values.
enum RandomValues {
    static func next(_ generator: inout SystemRandomNumberGenerator) -> [UInt8] {
        let seeds = [
            "{\"host\":\"127.0.0.1\",\"port\":8000,\"listen\":80}", "127.0.0.1:8000", "[::1]:80",
            "{\"host\":\"a\",\"port\":1e99}", "{\"port\":\"x\"}", "{{{{{{{{", "host:99999", "",
        ]
        switch generator.next() % 4 {
        case 0:
            return (0..<Int(generator.next() % 64)).map { _ in UInt8.random(in: 0...255, using: &generator) }
        case 1:
            var bytes = Array(seeds.randomElement(using: &generator)!.utf8)
            for _ in 0..<(1 + generator.next() % 4) where !bytes.isEmpty {
                bytes[Int(generator.next() % UInt64(bytes.count))] = UInt8.random(in: 32...126, using: &generator)
            }
            return bytes
        case 2:
            let seed = Array(seeds.randomElement(using: &generator)!.utf8)
            return Array(seed.prefix(Int(generator.next() % UInt64(seed.count + 1))))
        default:
            return Array(String(repeating: "[", count: Int(generator.next() % 2000)).utf8)
        }
    }
}
