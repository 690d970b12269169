import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `--balance leastconn|source`, `--slow-start` and `berth ctl weight`, through real `berth proxy`
/// processes with two workers and real whoami backends.
final class BalanceModeTests: BerthTestCase {
    private let auth = "Authorization: Basic YWRtaW46cHc=\r\n"  // admin:pw

    /// Starts `berth proxy` over `backends` with a stats server and the admin API.
    private func proxy(_ backends: [ListeningChild], options: [String]) throws -> (proxy: ListeningChild, stats: UInt16) {
        let stats = try TestSocket.freePort()
        let proxy = try startProxy(backends: backends.map(\.address),
                                   options: ["--workers", "2", "--stats", "127.0.0.1:\(stats)", "--stats-auth", "admin:pw"] + options)
        return (proxy, stats)
    }

    private func ctl(_ stats: UInt16, _ arguments: [String]) throws -> (Termination?, String, String) {
        try runBerth(["ctl"] + arguments + ["--stats", "127.0.0.1:\(stats)", "--auth", "admin:pw"])
    }

    /// `/stats.json`'s backends of service `proxy`, by address.
    private func backends(_ stats: UInt16) -> [String: [String: Any]] {
        guard case .success(let fd) = TestSocket.connect(stats, timeout: 5) else { return [:] }
        defer { Glibc.close(fd) }
        guard TestSocket.sendAll(fd, HTTPExchange.request("/stats.json", headers: auth + "Connection: close\r\n")),
              let response = HTTPExchange.readResponses(fd, count: 1, timeout: 5).responses.first,
              let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
              let services = object["services"] as? [[String: Any]],
              let rows = services.first?["backends"] as? [[String: Any]] else { return [:] }
        var byAddress: [String: [String: Any]] = [:]
        for row in rows { if let address = row["address"] as? String { byAddress[address] = row } }
        return byAddress
    }

    private func currentSessions(_ stats: UInt16, _ address: String) -> Int {
        (backends(stats)[address]?["traffic"] as? [String: Any])?["currentSessions"] as? Int ?? -1
    }

    /// The whoami identity answering one GET on a new connection from `source` (a 127/8 address).
    private func answer(_ port: UInt16, from source: String = "127.0.0.1") -> String? {
        let fd = TestSocket.makeSocket(source)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        TestSocket.setTimeouts(fd, seconds: 5)
        guard TestSocket.withAddress(source, 0, { Glibc.bind(fd, $0, $1) }) == 0,
              TestSocket.withAddress("127.0.0.1", port, { Glibc.connect(fd, $0, $1) }) == 0,
              TestSocket.sendAll(fd, HTTPExchange.request(headers: "Connection: close\r\n")),
              let response = HTTPExchange.readResponses(fd, count: 1, timeout: 5).responses.first else { return nil }
        return Self.identity(response)
    }

    private static func identity(_ response: HTTPResponse) -> String {
        String(decoding: response.body, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            .replacingOccurrences(of: "I'm ", with: "")
    }

    /// A keep-alive connection kept open after its first answer; returns it and who answered.
    private func held(_ port: UInt16) throws -> (fd: CInt, identity: String) {
        let fd = try connect(port)
        guard TestSocket.sendAll(fd, HTTPExchange.request()),
              let response = HTTPExchange.readResponses(fd, count: 1, timeout: 5).responses.first else {
            throw FixtureError("no answer on a held connection")
        }
        return (fd, Self.identity(response))
    }

    /// leastconn counts every worker's open connections: with two held on one backend and none
    /// on the other, the next two go to the empty one (round-robin would alternate).
    func testLeastConnSendsNewConnectionsToTheLeastLoadedBackendOverBothWorkers() throws {
        let a = try startWhoami(id: "a"), b = try startWhoami(id: "b")
        let (proxy, stats) = try proxy([a, b], options: ["--balance", "leastconn"])
        var open: [(fd: CInt, identity: String)] = []
        for _ in 0..<4 { open.append(try held(proxy.port)) }
        XCTAssertEqual(open.filter { $0.identity == "a" }.count, 2, "leastconn splits held connections evenly: \(open.map(\.identity))")
        // Close the two on b and wait until the proxy has seen them go.
        for connection in open where connection.identity == "b" { sockets.close(connection.fd) }
        XCTAssertNotNil(waitUntil(timeout: 5) { self.currentSessions(stats, b.address) == 0 }, "b's connections did not close")
        XCTAssertEqual(currentSessions(stats, a.address), 2)
        let next = try (0..<2).map { _ in try held(proxy.port).identity }
        XCTAssertEqual(next, ["b", "b"], "a has 2 open, b none: both new connections go to b")
        // 2 and 2 again: short connections now go to both.
        let short = (0..<6).compactMap { _ in answer(proxy.port) }
        XCTAssertEqual(Set(short), ["a", "b"], "\(short)")
    }

    /// source: a client host keeps its backend; taking one backend out (maint) moves only its
    /// clients, and bringing it back returns exactly them.
    func testSourceKeepsClientsAndMovesOnlyTheShareOfABackendThatLeaves() throws {
        let servers = try ["a", "b", "c"].map { try startWhoami(id: $0) }
        let (proxy, stats) = try proxy(servers, options: ["--balance", "source"])
        let sources = (10..<90).map { "127.0.0.\($0)" }
        var first: [String: String] = [:]
        for source in sources { first[source] = answer(proxy.port, from: source) }
        XCTAssertEqual(first.count, sources.count)
        for source in sources { XCTAssertEqual(answer(proxy.port, from: source), first[source], "\(source) changed backend") }
        let counts = Dictionary(grouping: first.values, by: { $0 }).mapValues(\.count)
        print("source: 80 client hosts over 3 backends: \(counts.sorted { $0.key < $1.key })")
        XCTAssertEqual(Set(counts.keys), ["a", "b", "c"])
        XCTAssertTrue(counts.values.allSatisfy { $0 >= 10 }, "\(counts)")

        let (maint, _, maintError) = try ctl(stats, ["maint", "proxy", servers[1].address])
        XCTAssertEqual(maint, .exited(0), maintError)
        var moved = 0
        for source in sources {
            let now = answer(proxy.port, from: source)
            if first[source] == "b" {
                XCTAssertNotEqual(now, "b")
                moved += 1
            } else {
                XCTAssertEqual(now, first[source], "\(source) was on \(first[source]!), not on the removed backend, and moved")
            }
        }
        print("source: b removed: \(moved) of \(sources.count) clients moved (b's share, \(counts["b"]!))")
        XCTAssertEqual(moved, counts["b"])
        let (enable, _, _) = try ctl(stats, ["enable", "proxy", servers[1].address])
        XCTAssertEqual(enable, .exited(0))
        for source in sources { XCTAssertEqual(answer(proxy.port, from: source), first[source], "\(source) after b came back") }
    }

    /// `berth ctl weight`: the split follows the new weight at once, weight 0 takes no new
    /// connection while an open one to it keeps working, and reset goes back to the table's.
    func testCtlWeightChangesTheSplitLiveAndWeightZeroKeepsOpenConnections() throws {
        let a = try startWhoami(id: "a"), b = try startWhoami(id: "b")
        let (proxy, stats) = try proxy([a, b], options: [])
        let (set, said, setError) = try ctl(stats, ["weight", "proxy", a.address, "3"])
        XCTAssertEqual(set, .exited(0), setError)
        XCTAssertTrue(said.contains("weight 3"), said)
        let seen = (0..<40).compactMap { _ in answer(proxy.port) }
        XCTAssertEqual(seen.filter { $0 == "a" }.count, 30, "\(seen)")
        XCTAssertEqual(backends(stats)[a.address]?["weight"] as? Int, 3)
        XCTAssertEqual(backends(stats)[a.address]?["operatorWeight"] as? Bool, true)

        // An open connection on b, then b's weight to 0.
        var onB: CInt = -1
        for _ in 0..<8 where onB < 0 {
            let connection = try held(proxy.port)
            if connection.identity == "b" { onB = connection.fd } else { sockets.close(connection.fd) }
        }
        XCTAssertGreaterThanOrEqual(onB, 0, "no connection reached b")
        XCTAssertEqual(try ctl(stats, ["weight", "proxy", b.address, "0"]).0, .exited(0))
        XCTAssertEqual(Set((0..<10).compactMap { _ in answer(proxy.port) }), ["a"], "weight 0 took a new connection")
        XCTAssertTrue(TestSocket.sendAll(onB, HTTPExchange.request()))
        let again = HTTPExchange.readResponses(onB, count: 1, timeout: 5).responses.first
        XCTAssertEqual(again.map(Self.identity), "b", "the open connection to the weight-0 backend stopped working")
        let (_, listing, _) = try ctl(stats, ["list"])
        XCTAssertTrue(listing.split(separator: "\n").contains { $0.contains(b.address) && $0.contains("0 (set)") }, listing)

        XCTAssertEqual(try ctl(stats, ["weight", "proxy", b.address, "reset"]).0, .exited(0))
        XCTAssertEqual(backends(stats)[b.address]?["weight"] as? Int, 1)
        XCTAssertNil(backends(stats)[b.address]?["operatorWeight"])
        XCTAssertEqual(Set((0..<8).compactMap { _ in answer(proxy.port) }), ["a", "b"])

        for bad in ["257", "-1", "x", "1.5"] {
            let (ended, _, error) = try ctl(stats, ["weight", "proxy", b.address, bad])
            XCTAssertEqual(ended, .exited(64), "\(bad): \(error)")
            XCTAssertTrue(error.contains("weight"), error)
        }
        let (unknown, _, unknownError) = try ctl(stats, ["weight", "proxy", "127.0.0.1:1", "2"])
        XCTAssertEqual(unknown, .exited(1))
        XCTAssertTrue(unknownError.contains("no backend"), unknownError)
    }

    /// `--slow-start 3s`: a backend back from maintenance gets a small share first, then its
    /// full share once the period has passed; the page shows the ramp.
    func testSlowStartRampsABackendThatComesBack() throws {
        let a = try startWhoami(id: "a"), b = try startWhoami(id: "b")
        let (proxy, stats) = try proxy([a, b], options: ["--slow-start", "3s"])
        // At start both serve at full weight (slow start is for backends that come up later).
        XCTAssertEqual(Set((0..<4).compactMap { _ in answer(proxy.port) }), ["a", "b"])
        XCTAssertEqual(try ctl(stats, ["maint", "proxy", b.address]).0, .exited(0))
        XCTAssertEqual(Set((0..<4).compactMap { _ in answer(proxy.port) }), ["a"])
        XCTAssertEqual(try ctl(stats, ["enable", "proxy", b.address]).0, .exited(0))
        let start = now()
        var samples: [(time: Double, identity: String)] = []
        var warmups: [Int] = []
        while now() - start < 4.4 {
            if let identity = answer(proxy.port) { samples.append((now() - start, identity)) }
            if warmups.count < Int((now() - start) / 0.5), let percent = backends(stats)[b.address]?["warmupPercent"] as? Int {
                warmups.append(percent)
            }
        }
        func share(_ range: ClosedRange<Double>) -> (Double, Int) {
            let window = samples.filter { range.contains($0.time) }
            return (Double(window.filter { $0.identity == "b" }.count) / Double(max(1, window.count)), window.count)
        }
        let early = share(0...0.9), late = share(3.4...4.4)
        print("slow start 3s: b's share in its first 0.9 s \(early.0) of \(early.1), after 3.4 s \(late.0) of \(late.1); warmup seen \(warmups)%")
        XCTAssertGreaterThan(early.1, 20)
        XCTAssertGreaterThan(late.1, 20)
        XCTAssertLessThan(early.0, 0.2, "a backend in slow start got a full share at once")
        XCTAssertTrue((0.35...0.65).contains(late.0), "after the slow start b should have half: \(late.0)")
        XCTAssertFalse(warmups.isEmpty, "the page never showed the ramp")
        XCTAssertTrue(warmups.allSatisfy { (0..<100).contains($0) }, "\(warmups)")
        XCTAssertEqual(warmups, warmups.sorted(), "the warmup went down: \(warmups)")
        XCTAssertNil(backends(stats)[b.address]?["warmupPercent"], "still ramping after the period")
    }

    /// Discovery: `"balance":"source"` and `"slow_start"` from a service's `_config`. An instance
    /// put in etcd takes clients only for itself (ramping, as the page shows); one deleted gives
    /// back only its own.
    func testDiscoveryTakesBalanceAndSlowStartFromTheServiceConfig() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let servers = try ["a", "b", "c"].map { try startWhoami(id: $0) }
        let listen = UInt16(try freeLoopbackPort())
        let stats = try TestSocket.freePort()
        try etcd.etcdctl(["put", "/backends/_config/whoami", #"{"balance":"source","slow_start":"2s"}"#])
        for server in servers.prefix(2) {
            try etcd.etcdctl(["put", "/backends/whoami/\(server.address)", "{\"host\":\"127.0.0.1\",\"port\":\(server.port),\"listen\":\(listen)}"])
        }
        let discover = try launch(BerthBinary.path, ["discover", "--bind", "127.0.0.1", "--workers", "2", "--stats", "127.0.0.1:\(stats)"],
                                  environment: ["ETCD_HOST": "127.0.0.1:\(etcd.members[0].clientPort)"])
        XCTAssertTrue(discover.waitForStandardError(containing: "watching the registry", timeout: 10), discover.standardError)
        XCTAssertNotNil(waitUntil(timeout: 5) { self.backends(stats).count == 2 }, discover.standardError)
        let sources = (100..<160).map { "127.0.0.\($0)" }
        var first: [String: String] = [:]
        for source in sources { first[source] = answer(listen, from: source) }
        XCTAssertEqual(Set(first.values), ["a", "b"], "\(first)")
        for source in sources.prefix(20) { XCTAssertEqual(answer(listen, from: source), first[source]) }

        let c = servers[2]
        try etcd.etcdctl(["put", "/backends/whoami/\(c.address)", "{\"host\":\"127.0.0.1\",\"port\":\(c.port),\"listen\":\(listen)}"])
        XCTAssertNotNil(waitUntil(timeout: 5) { self.backends(stats).count == 3 })
        let ramp = backends(stats)[c.address]?["warmupPercent"] as? Int
        XCTAssertNotNil(ramp, "the new instance does not ramp: \(backends(stats)[c.address] ?? [:])")
        XCTAssertNotNil(waitUntil(timeout: 5) { self.backends(stats)[c.address]?["warmupPercent"] == nil })
        var second: [String: String] = [:]
        for source in sources { second[source] = answer(listen, from: source) }
        let toC = sources.filter { second[$0] != first[$0] }
        XCTAssertTrue(toC.allSatisfy { second[$0] == "c" }, "clients moved elsewhere than to the new instance: \(toC.map { "\($0): \(first[$0]!)->\(second[$0]!)" })")
        print("source via discovery: c added: \(toC.count) of \(sources.count) clients moved, all to c")
        XCTAssertGreaterThan(toC.count, 0)

        let b = servers[1]
        try etcd.etcdctl(["del", "/backends/whoami/\(b.address)"])
        XCTAssertNotNil(waitUntil(timeout: 5) { self.backends(stats).count == 2 })
        var moved = 0
        for source in sources {
            let now = answer(listen, from: source)
            if second[source] == "b" { moved += 1; XCTAssertNotEqual(now, "b") } else { XCTAssertEqual(now, second[source], source) }
        }
        print("source via discovery: b deleted: \(moved) of \(sources.count) clients moved (b's own)")
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
    }

    func testBadBalanceAndSlowStartAreRefused() throws {
        for (flag, value) in [("--balance", "random"), ("--slow-start", "soon"), ("--slow-start", "-1s")] {
            let (ended, _, error) = try runBerth(["proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1", flag, value])
            XCTAssertEqual(ended, .exited(64), "\(flag) \(value): \(error)")
            XCTAssertTrue(error.contains(flag.dropFirst(2)), "\(flag) \(value): \(error)")
        }
    }
}
