import BerthEngine
@testable import BerthRegistry
import BerthSystem
import BerthHealth
@testable import BerthDiscovery
import XCTest

/// The catalog and catalog → routing table: pure, no etcd, no sockets.
final class CatalogTests: XCTestCase {
    private let bind = try! SocketAddress(host: "0.0.0.0", port: 0)

    private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    private func address(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

    private func build(_ catalog: inout Catalog, now: Int64 = 0, resolve: (String) -> HostResolution = { _ in .failed("none") }) -> RoutingBuild {
        catalog.routingTable(bind: bind, now: now, resolve: resolve)
    }

    private func backends(_ build: RoutingBuild, _ service: String) -> [Backend]? {
        build.table.frontends.first { $0.name == service }?.backends
    }

    func testBerthJSONLayout() {
        var catalog = Catalog()
        catalog.reset(entries: [
            ("/backends/jwilder%2Fwhoami/c1", bytes(#"{"host":"127.0.0.5","port":32768,"listen":8000}"#)),
            ("/backends/jwilder%2Fwhoami/c2", bytes(#"{"host":"127.0.0.6","port":32769,"listen":8000,"draining":true}"#)),
        ], revision: 7)
        let result = build(&catalog)
        XCTAssertEqual(result.table, RoutingTable(revision: 7, frontends: [
            Frontend(name: "jwilder/whoami", listen: address("0.0.0.0:8000"), backends: [
                Backend(name: "c1", address: address("127.0.0.5:32768")),
                Backend(name: "c2", address: address("127.0.0.6:32769"), enabled: false),
            ]),
        ]))
        XCTAssertNil(result.table.validationError())
        XCTAssertEqual(result.problems, [])
        XCTAssertEqual(result.checks, [:])
    }

    func testSeedLayoutWithPortKey() {
        var catalog = Catalog()
        catalog.reset(entries: [
            ("/backends/whoami/736ab83847bb", bytes("10.170.71.226:49153")),
            ("/backends/whoami/4eb0498e5207", bytes("10.170.71.227:49154\n")),
            ("/backends/whoami/port", bytes("8000")),
        ], revision: 3)
        let result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.listen), [address("0.0.0.0:8000")])
        XCTAssertEqual(backends(result, "whoami")?.map(\.name), ["4eb0498e5207", "736ab83847bb"])
        XCTAssertEqual(backends(result, "whoami")?.map(\.address), [address("10.170.71.227:49154"), address("10.170.71.226:49153")])
    }

    func testOrderOfKeysDoesNotMatter() {
        let entries: [(key: String, value: [UInt8])] = [
            ("/backends/_config/s", bytes(#"{"retries":7}"#)),
            ("/backends/s/port", bytes("8000")),
            ("/backends/s/a", bytes("10.0.0.1:1")),
        ]
        var forward = Catalog()
        forward.reset(entries: entries, revision: 1)
        var backward = Catalog()
        backward.reset(entries: entries.reversed(), revision: 1)
        var oneByOne = Catalog()
        for (offset, entry) in entries.enumerated() {
            XCTAssertEqual(oneByOne.apply(put: entry.key, value: entry.value, revision: Int64(offset + 1)), .changed)
        }
        for var catalog in [forward, backward, oneByOne] {
            XCTAssertEqual(catalog.services["s"], Catalog.Service(instances: ["a": InstanceRecord(host: "10.0.0.1", port: 1)],
                                                                  seedPort: 8000, config: ServiceConfig(retries: 7)))
            let table = build(&catalog).table
            XCTAssertEqual(table.frontends.map(\.listen.port), [8000])
            XCTAssertEqual(table.frontends.map(\.settings.retries), [7])
        }
    }

    func testRegistratorLayoutTakesListenFromConfigOrDefault() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 9000))
        catalog.reset(entries: [
            ("/backends/api/host1:api:8080", bytes("10.0.0.1:32001")),
            ("/backends/web/host1:web:80", bytes("10.0.0.1:32002")),
            ("/backends/_config/web", bytes(#"{"listen":8080,"retries":1}"#)),
        ], revision: 1)
        let result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.name), ["api", "web"])
        XCTAssertEqual(result.table.frontends.map(\.listen.port), [9000, 8080])
        XCTAssertEqual(result.table.frontends[1].settings.retries, 1)
        XCTAssertEqual(backends(result, "api")?.first?.name, "host1:api:8080")

        var noDefault = Catalog()
        noDefault.reset(entries: [("/backends/api/i", bytes("10.0.0.1:1"))], revision: 1)
        let unroutable = build(&noDefault)
        XCTAssertEqual(unroutable.table.frontends, [])
        XCTAssertEqual(unroutable.problems, [ServiceProblem(service: "api", kind: .noListenPort)])
        XCTAssertTrue(unroutable.problems[0].isFatalForService)
    }

    func testListenPrecedenceAndDisagreement() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 1))
        catalog.reset(entries: [
            ("/backends/s/a", bytes(#"{"host":"10.0.0.1","port":1,"listen":8002}"#)),
            ("/backends/s/b", bytes(#"{"host":"10.0.0.2","port":1,"listen":8001}"#)),
            ("/backends/s/c", bytes("10.0.0.3:1")),
            ("/backends/s/port", bytes("7000")),
            ("/backends/_config/s", bytes(#"{"listen":7500}"#)),
        ], revision: 1)
        var result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.listen.port), [8001])
        XCTAssertEqual(result.problems, [ServiceProblem(service: "s", kind: .listenDisagreement(ports: [8001, 8002], used: 8001))])
        XCTAssertFalse(result.problems[0].isFatalForService)
        XCTAssertEqual(backends(result, "s")?.count, 3)
        catalog.apply(delete: "/backends/s/a", revision: 2)
        catalog.apply(delete: "/backends/s/b", revision: 3)
        result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.listen.port), [7500], "_config before the port key")
        catalog.apply(delete: "/backends/_config/s", revision: 4)
        XCTAssertEqual(build(&catalog).table.frontends.map(\.listen.port), [7000], "the port key before the default")
        catalog.apply(delete: "/backends/s/port", revision: 5)
        XCTAssertEqual(build(&catalog).table.frontends.map(\.listen.port), [1])
    }

    func testRevisionsOrderAndIdempotentReplay() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 80))
        catalog.reset(entries: [], revision: 10)
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.1:1"), revision: 10), .stale, "the listing holds revision 10")
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.1:1"), revision: 11), .changed)
        // A transaction: two keys at one revision both apply.
        XCTAssertEqual(catalog.apply(put: "/backends/s/b", value: bytes("10.0.0.2:1"), revision: 12), .changed)
        XCTAssertEqual(catalog.apply(put: "/backends/s/c", value: bytes("10.0.0.3:1"), revision: 12), .changed)
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.9:1"), revision: 13), .changed)
        XCTAssertEqual(catalog.apply(delete: "/backends/s/b", revision: 14), .changed)
        XCTAssertEqual(catalog.revision, 14)
        let before = catalog.services
        // A watch resumed from revision 11 replays everything: nothing changes.
        let replay: [Catalog.Event] = [
            .put(key: "/backends/s/a", value: bytes("10.0.0.1:1"), revision: 11),
            .put(key: "/backends/s/b", value: bytes("10.0.0.2:1"), revision: 12),
            .put(key: "/backends/s/c", value: bytes("10.0.0.3:1"), revision: 12),
            .put(key: "/backends/s/a", value: bytes("10.0.0.9:1"), revision: 13),
            .delete(key: "/backends/s/b", revision: 14),
        ]
        XCTAssertFalse(catalog.apply(replay))
        XCTAssertEqual(catalog.services, before)
        XCTAssertEqual(catalog.apply(delete: "/backends/s/b", revision: 14), .stale, "a repeat at the same revision")
        XCTAssertEqual(catalog.services["s"]?.instances.keys.sorted(), ["a", "c"])
        XCTAssertEqual(catalog.services["s"]?.instances["a"]?.host, "10.0.0.9")
        XCTAssertEqual(build(&catalog).table.revision, 14)
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.9:1"), revision: 15), .unchanged)
        XCTAssertEqual(catalog.apply(put: "/other/x/y", value: bytes("garbage"), revision: 16), .ignored(.outsidePrefix))
        XCTAssertEqual(catalog.malformed.total, 0)
    }

    func testKeysAsBytes() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 80))
        catalog.reset(byteEntries: [(bytes("/backends/s/a"), bytes("10.0.0.1:1")), (bytes("/backends/s/") + [0xFF], bytes("10.0.0.2:1")),
                                    ([0xFF], bytes("x"))], revision: 1)
        XCTAssertEqual(catalog.instanceCount, 1)
        XCTAssertEqual(catalog.malformed.byReason, [.key(.keyNotUTF8): 1], "a bad key outside the prefix is not ours")
        XCTAssertEqual(catalog.apply(put: bytes("/backends/s/b"), value: bytes("10.0.0.2:1"), revision: 2), .changed)
        guard case .malformed = catalog.apply(put: bytes("/backends/") + [0xC3, 0x28] + bytes("/i"), value: bytes("10.0.0.3:1"), revision: 3) else {
            return XCTFail("should be malformed")
        }
        XCTAssertEqual(catalog.apply(delete: bytes("/backends/s/a"), revision: 4), .changed)
        XCTAssertEqual(catalog.apply(delete: bytes("/backends/s/a"), revision: 3), .stale)
        XCTAssertEqual(catalog.services["s"]?.instances.keys.sorted(), ["b"])
        XCTAssertEqual(catalog.malformed.total, 2)
    }

    func testResetReportsWhatDisappeared() {
        var catalog = Catalog()
        catalog.reset(entries: [
            ("/backends/s/a", bytes("10.0.0.1:1")), ("/backends/s/b", bytes("10.0.0.2:1")),
            ("/backends/t/x", bytes("10.0.0.3:1")), ("/backends/t/port", bytes("90")),
        ], revision: 5)
        catalog.apply(put: "/backends/s/c", value: bytes("10.0.0.4:1"), revision: 6)
        // Compacted while away: a re-list at 20 where b, c and all of t are gone, a changed, d new.
        let diff = catalog.reset(entries: [
            ("/backends/s/a", bytes("10.0.0.5:1")), ("/backends/s/d", bytes("10.0.0.6:1")),
        ], revision: 20)
        XCTAssertEqual(diff.removed, [InstanceID(service: "s", instance: "b"), InstanceID(service: "s", instance: "c"),
                                      InstanceID(service: "t", instance: "x")])
        XCTAssertEqual(diff.added, [InstanceID(service: "s", instance: "d")])
        XCTAssertEqual(diff.changed, [InstanceID(service: "s", instance: "a")])
        XCTAssertEqual(diff.servicesReconfigured, ["t"])
        XCTAssertEqual(Set(catalog.services.keys), ["s"])
        XCTAssertEqual(catalog.revision, 20)
        XCTAssertTrue(catalog.reset(entries: [("/backends/s/a", bytes("10.0.0.5:1")), ("/backends/s/d", bytes("10.0.0.6:1"))],
                                    revision: 21).isEmpty)
    }

    func testMalformedValuesAreSkippedCountedAndReplaceTheGoodOne() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 80, malformedHistory: 2))
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.1:1"), revision: 1), .changed)
        let outcome = catalog.apply(put: "/backends/s/a", value: bytes("not an address"), revision: 2)
        guard case .malformed(let entry, let removed) = outcome else { return XCTFail("\(outcome)") }
        XCTAssertTrue(removed)
        XCTAssertTrue(outcome.changesCatalog)
        XCTAssertEqual(entry.key, "/backends/s/a")
        XCTAssertEqual(entry.reason, .value(.badPort))
        XCTAssertNil(catalog.services["s"], "the key's current value is what counts")
        XCTAssertEqual(catalog.malformedKeys, ["/backends/s/a": .value(.badPort)])
        catalog.apply(put: "/backends/s/b", value: bytes("{"), revision: 3)
        catalog.apply(put: "/backends/a/b/c", value: bytes("10.0.0.1:1"), revision: 4)
        catalog.apply(put: "/backends/s/port", value: bytes("http"), revision: 5)
        XCTAssertEqual(catalog.malformed.total, 4)
        XCTAssertEqual(catalog.malformed.byReason, [.value(.badPort): 2, .value(.notJSON): 1, .key(.wrongDepth): 1])
        XCTAssertEqual(catalog.malformed.recent.map(\.revision), [4, 5], "bounded, oldest first")
        // Fixed, then deleted: the key is no longer malformed.
        XCTAssertEqual(catalog.apply(put: "/backends/s/a", value: bytes("10.0.0.1:1"), revision: 6), .changed)
        catalog.apply(delete: "/backends/s/b", revision: 7)
        XCTAssertEqual(Set(catalog.malformedKeys.keys), ["/backends/a/b/c", "/backends/s/port"])
        XCTAssertEqual(build(&catalog).table.frontends.map(\.backends.count), [1])
    }

    func testPortConflictsKeepTheHolder() {
        var catalog = Catalog()
        catalog.reset(entries: [("/backends/zeta/1", bytes(#"{"host":"10.0.0.1","port":1,"listen":8000}"#))], revision: 1)
        XCTAssertEqual(build(&catalog).table.frontends.map(\.name), ["zeta"])
        // A newcomer that sorts first does not take the port from the service that holds it.
        catalog.apply(put: "/backends/alpha/1", value: bytes(#"{"host":"10.0.0.2","port":1,"listen":8000}"#), revision: 2)
        catalog.apply(put: "/backends/beta/1", value: bytes(#"{"host":"10.0.0.3","port":1,"listen":8001}"#), revision: 3)
        var result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.name), ["beta", "zeta"])
        XCTAssertEqual(result.problems, [ServiceProblem(service: "alpha", kind: .portConflict(port: 8000, heldBy: "zeta"))])
        XCTAssertNil(result.table.validationError())
        // Two newcomers: the first by name wins.
        var fresh = Catalog()
        fresh.reset(entries: [("/backends/b/1", bytes(#"{"host":"10.0.0.1","port":1,"listen":9000}"#)),
                              ("/backends/a/1", bytes(#"{"host":"10.0.0.1","port":2,"listen":9000}"#))], revision: 1)
        XCTAssertEqual(build(&fresh).table.frontends.map(\.name), ["a"])
        // Once the holder is gone (linger 0), the other service gets the port.
        var quick = Catalog(options: Catalog.Options(linger: 0))
        quick.reset(entries: [("/backends/zeta/1", bytes(#"{"host":"10.0.0.1","port":1,"listen":8000}"#)),
                              ("/backends/alpha/1", bytes(#"{"host":"10.0.0.2","port":1,"listen":8000}"#))], revision: 1)
        XCTAssertEqual(build(&quick).table.frontends.map(\.name), ["alpha"])
        quick.apply(delete: "/backends/alpha/1", revision: 2)
        result = build(&quick)
        XCTAssertEqual(result.table.frontends.map(\.name), ["zeta"])
        XCTAssertEqual(result.problems, [])
    }

    func testLingerKeepsAnEmptyFrontendThenDropsIt() {
        var catalog = Catalog(options: Catalog.Options(linger: 30_000))
        catalog.reset(entries: [
            ("/backends/s/a", bytes(#"{"host":"10.0.0.1","port":1,"listen":8000}"#)),
            ("/backends/t/a", bytes(#"{"host":"10.0.0.1","port":2,"listen":8001}"#)),
            ("/backends/_config/t", bytes(#"{"linger":"5s"}"#)),
        ], revision: 1)
        var result = build(&catalog, now: 1_000)
        XCTAssertNil(result.nextEvaluation)
        catalog.apply(delete: "/backends/s/a", revision: 2)
        catalog.apply(delete: "/backends/t/a", revision: 3)
        result = build(&catalog, now: 2_000)
        XCTAssertEqual(result.table.frontends.map(\.name), ["s", "t"])
        XCTAssertEqual(result.table.frontends.map(\.backends), [[], []])
        XCTAssertEqual(result.table.frontends.map(\.listen.port), [8000, 8001], "the port it had, though no instance says it now")
        XCTAssertEqual(result.lingering, ["s", "t"])
        XCTAssertEqual(result.nextEvaluation, 7_000, "t's own linger is 5 s")
        result = build(&catalog, now: 7_000)
        XCTAssertEqual(result.table.frontends.map(\.name), ["s"])
        XCTAssertEqual(result.nextEvaluation, 32_000)
        // An instance comes back in time: served again, the linger clock is cleared.
        catalog.apply(put: "/backends/s/b", value: bytes(#"{"host":"10.0.0.2","port":1}"#), revision: 4)
        catalog.apply(put: "/backends/s/port", value: bytes("8000"), revision: 4)
        result = build(&catalog, now: 8_000)
        XCTAssertEqual(backends(result, "s")?.map(\.name), ["b"])
        XCTAssertNil(result.nextEvaluation)
        catalog.apply(delete: "/backends/s/b", revision: 5)
        XCTAssertEqual(build(&catalog, now: 9_000).nextEvaluation, 39_000)
        result = build(&catalog, now: 39_000)
        XCTAssertEqual(result.table.frontends, [])
        XCTAssertNil(result.nextEvaluation)
        XCTAssertEqual(build(&catalog, now: 40_000).table.frontends, [], "a dropped service does not come back")
    }

    func testAServiceGoneInAReListLingersToo() {
        var catalog = Catalog(options: Catalog.Options(linger: 1_000))
        catalog.reset(entries: [("/backends/s/a", bytes(#"{"host":"10.0.0.1","port":1,"listen":8000}"#))], revision: 1)
        XCTAssertEqual(build(&catalog, now: 0).table.frontends.count, 1)
        let diff = catalog.reset(entries: [("/backends/other/x", bytes("garbage"))], revision: 50)
        XCTAssertEqual(diff.removed, [InstanceID(service: "s", instance: "a")])
        var result = build(&catalog, now: 100)
        XCTAssertEqual(result.table.frontends.map(\.name), ["s"])
        XCTAssertEqual(result.table.frontends.first?.backends, [])
        XCTAssertEqual(result.table.revision, 50)
        XCTAssertEqual(result.nextEvaluation, 1_100)
        result = build(&catalog, now: 1_100)
        XCTAssertEqual(result.table.frontends, [])
        let statistics = catalog.statistics
        XCTAssertEqual(statistics.revision, 50)
        XCTAssertEqual(statistics.services, 0)
        XCTAssertEqual(statistics.malformedTotal, 1)
        XCTAssertEqual(statistics.malformedNow, 1)
        XCTAssertEqual(statistics.recentMalformed.map(\.key), ["/backends/other/x"])
    }

    func testChecksAndSettingsFromConfig() {
        var catalog = Catalog()
        catalog.reset(entries: [
            ("/backends/web/a", bytes(#"{"host":"10.0.0.1","port":1,"listen":80}"#)),
            ("/backends/db/a", bytes(#"{"host":"10.0.0.2","port":1,"listen":5432}"#)),
            ("/backends/_config/web", bytes(#"{"check":{"kind":"http","path":"/health","rise":2},"server_timeout":"5m"}"#)),
        ], revision: 1)
        let defaults = FrontendSettings(retries: 5)
        let result = catalog.routingTable(bind: bind, defaults: defaults, checkDefaults: CheckSettings(interval: 500), now: 0)
        XCTAssertEqual(result.checks, ["web": CheckSettings(kind: .http(HTTPCheck(path: "/health")), interval: 500, rise: 2)])
        XCTAssertEqual(result.table.frontends.map(\.settings), [defaults, FrontendSettings(retries: 5, serverTimeout: 300_000)])
    }

    func testIPv6AndNamesAndUnsupportedProtocols() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 80))
        catalog.reset(entries: [
            ("/backends/s/v6", bytes("[2001:db8::1]:8080")),
            ("/backends/s/v6json", bytes(#"{"host":"::1","port":81}"#)),
            ("/backends/s/local", bytes("localhost:82")),
            ("/backends/s/named", bytes("db.internal:83")),
            ("/backends/s/lost", bytes("nowhere.invalid:84")),
            ("/backends/s/later", bytes("later.internal:85")),
            ("/backends/s/udp", bytes(#"{"host":"10.0.0.1","port":86,"proto":"udp"}"#)),
        ], revision: 1)
        XCTAssertEqual(catalog.hostNames, ["db.internal", "nowhere.invalid", "later.internal"])
        var asked: [String] = []
        let v6bind = try! SocketAddress(host: "::", port: 0)
        let result = catalog.routingTable(bind: v6bind, now: 0) { name in
            asked.append(name)
            switch name {
            case "db.internal": return .resolved(try! SocketAddress(host: "10.1.2.3", port: 0))
            case "later.internal": return .pending
            default: return .failed("Name or service not known")
            }
        }
        XCTAssertEqual(Set(asked), ["db.internal", "nowhere.invalid", "later.internal"], "IP literals and localhost are not looked up")
        XCTAssertEqual(result.table.frontends.first?.listen, address("[::]:80"))
        XCTAssertEqual(result.table.frontends.first?.backends, [
            Backend(name: "local", address: address("127.0.0.1:82")),
            Backend(name: "named", address: address("10.1.2.3:83")),
            Backend(name: "v6", address: address("[2001:db8::1]:8080")),
            Backend(name: "v6json", address: address("[::1]:81")),
        ])
        XCTAssertEqual(result.problems.map(\.kind), [
            .unresolvedHost(instance: "later", host: "later.internal", reason: "lookup pending"),
            .unresolvedHost(instance: "lost", host: "nowhere.invalid", reason: "Name or service not known"),
            .unsupportedProtocol(instance: "udp", proto: "udp"),
        ])
    }

    func testScaleOfOneThousandServices() {
        var entries: [(key: String, value: [UInt8])] = []
        for service in 0..<1_000 {
            for instance in 0..<10 {
                entries.append(("/backends/svc\(service)/i\(instance)",
                                bytes(#"{"host":"10.0.\#(instance).1","port":\#(20_000 + service),"listen":\#(30_000 + service)}"#)))
            }
        }
        var catalog = Catalog()
        catalog.reset(entries: entries, revision: 99)
        XCTAssertEqual(catalog.instanceCount, 10_000)
        let result = build(&catalog)
        XCTAssertEqual(result.table.frontends.count, 1_000)
        XCTAssertNil(result.table.validationError())
    }

    /// A build reuses the frontends of services whose keys did not change: after every step of
    /// a random history (puts, deletes, malformed values, configs, port conflicts, names, a
    /// re-list), the table equals one built from scratch by the same catalog.
    func testIncrementalBuildEqualsAFullBuild() {
        var generator = SystemRandomNumberGenerator()
        var catalog = Catalog(options: Catalog.Options(linger: 50))
        var revision: Int64 = 1
        var rebuiltServices = 0
        let resolve: (String) -> HostResolution = { name in
            name.hasSuffix(".ok") ? .resolved(try! SocketAddress(host: "10.9.9.9", port: 0)) : .failed("unknown")
        }
        for step in 0..<3_000 {
            let service = "s\(Int.random(in: 0..<12, using: &generator))"
            let instance = "i\(Int.random(in: 0..<5, using: &generator))"
            revision += 1
            switch Int.random(in: 0..<20, using: &generator) {
            case 0..<8:
                let listen = 40_000 + Int.random(in: 0..<14, using: &generator)
                let host = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "db.ok", "gone.invalid"].randomElement(using: &generator)!
                catalog.apply(put: "/backends/\(service)/\(instance)",
                              value: bytes(#"{"host":"\#(host)","port":\#(Int.random(in: 1..<4, using: &generator)),"listen":\#(listen)}"#), revision: revision)
            case 8..<15:
                catalog.apply(delete: "/backends/\(service)/\(instance)", revision: revision)
            case 15:
                catalog.apply(put: "/backends/\(service)/\(instance)", value: bytes("{not json"), revision: revision)
            case 16:
                catalog.apply(put: "/backends/_config/\(service)", value: bytes(#"{"retries":\#(Int.random(in: 0..<3, using: &generator)),"check":{"kind":"tcp"}}"#), revision: revision)
            case 17:
                catalog.apply(delete: "/backends/_config/\(service)", revision: revision)
            case 18:
                // An instance with no listen port: the service may have none.
                catalog.apply(put: "/backends/\(service)/\(instance)", value: bytes(#"{"host":"10.0.0.1","port":1}"#), revision: revision)
            default:
                if step % 500 == 0 {
                    catalog.reset(entries: [("/backends/s1/i0", bytes(#"{"host":"10.0.0.1","port":1,"listen":40000}"#))], revision: revision)
                }
            }
            let now = Int64(step)
            rebuiltServices += catalog.changedServices?.count ?? 12
            var full = catalog
            full.changedServices = nil
            let expected = full.routingTable(bind: bind, now: now, resolve: resolve)
            let incremental = catalog.routingTable(bind: bind, now: now, resolve: resolve)
            XCTAssertEqual(incremental, expected, "step \(step)")
            XCTAssertNil(incremental.table.validationError(), "step \(step)")
            if incremental != expected { return }
        }
        XCTAssertLessThan(rebuiltServices, 3_000 * 3, "a step rebuilds the services it changed, not all 12")
    }

    /// `services`: other services' keys are ignored, and each watched range keeps its own
    /// revision order (one watch stream each: etcd orders events within a watch only), so a
    /// range that is behind another still applies, while a replay within a range does not.
    func testAServiceFilterIgnoresOthersAndOrdersEachRangeOnItsOwn() {
        var catalog = Catalog(options: Catalog.Options(services: ["a", "b"]))
        XCTAssertEqual(catalog.options.watchRanges, ["/backends/_config/", "/backends/a/", "/backends/b/"])
        catalog.reset(entries: [("/backends/a/1", bytes(#"{"host":"10.0.0.1","port":1,"listen":80}"#))], revision: 10)
        XCTAssertEqual(catalog.apply(put: "/backends/c/1", value: bytes(#"{"host":"10.0.0.3","port":1,"listen":82}"#), revision: 11),
                       .ignored(.otherService))
        XCTAssertEqual(catalog.apply(put: "/backends/_config/c", value: bytes(#"{"retries":1}"#), revision: 12), .ignored(.otherService))
        // a's stream is at 20 when b's delivers 15: both apply.
        XCTAssertEqual(catalog.apply(put: "/backends/a/2", value: bytes(#"{"host":"10.0.0.1","port":2,"listen":80}"#), revision: 20), .changed)
        XCTAssertEqual(catalog.apply(put: "/backends/b/1", value: bytes(#"{"host":"10.0.0.2","port":1,"listen":81}"#), revision: 15), .changed)
        XCTAssertEqual(catalog.apply(put: "/backends/_config/b", value: bytes(#"{"retries":1}"#), revision: 13), .changed)
        // Replays within a range are still ignored.
        XCTAssertEqual(catalog.apply(delete: "/backends/b/1", revision: 14), .stale)
        XCTAssertEqual(catalog.apply(delete: "/backends/a/1", revision: 19), .stale)
        XCTAssertEqual(catalog.revision, 20)
        let result = build(&catalog)
        XCTAssertEqual(result.table.frontends.map(\.name), ["a", "b"])
        XCTAssertEqual(backends(result, "a")?.map(\.name), ["1", "2"])
        XCTAssertEqual(result.table.frontends.last?.settings.retries, 1)
        // Without a filter, one range: an event older than the last is a replay.
        var whole = Catalog()
        whole.reset(entries: [], revision: 10)
        XCTAssertEqual(whole.apply(put: "/backends/a/1", value: bytes(#"{"host":"10.0.0.1","port":1,"listen":80}"#), revision: 20), .changed)
        XCTAssertEqual(whole.apply(put: "/backends/b/1", value: bytes(#"{"host":"10.0.0.2","port":1,"listen":81}"#), revision: 15), .stale)
    }
}
