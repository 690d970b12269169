import BerthDiscovery
import BerthEngine
import BerthSystem
import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `--state-file` end to end: `berth discover` as a child process against a real etcd, stopped,
/// restarted without etcd (a dead port, a peer that never answers), then etcd back.
final class StateFileCommandTests: BerthTestCase {
    private func temporaryDirectory() throws -> String {
        let path = NSTemporaryDirectory() + "berth-state-e2e-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    /// The file's state, or nil while it is missing or not (yet) readable.
    private func saved(_ path: String) -> SavedState? {
        guard let bytes = FileManager.default.contents(atPath: path) else { return nil }
        return try? StateFile.decode(Array(bytes))
    }

    private func backendNames(_ state: SavedState?) -> Set<String> {
        Set(state?.table.frontends.flatMap { $0.backends.map(\.name) } ?? [])
    }

    private func instance(_ backend: ListeningChild, listen: Int) -> String {
        "{\"host\":\"127.0.0.1\",\"port\":\(backend.port),\"listen\":\(listen)}"
    }

    private func discover(etcd: String, stateFile: String, statsPort: Int) throws -> ChildProcess {
        try launch(BerthBinary.path, ["discover", "--etcd", etcd, "--bind", "127.0.0.1", "--workers", "1",
                                      "--state-file", stateFile, "--stats", "127.0.0.1:\(statsPort)"])
    }

    /// The whoami ids that answered `count` requests through the proxy (failures skipped).
    private func answers(_ port: Int, count: Int) -> [String] {
        (0..<count).compactMap { _ in
            guard let body = try? HTTPProbe.get(port: port, timeout: 2) else { return nil }
            return ["one", "two", "three"].first { body.contains("I'm \($0)") }
        }
    }

    /// `/stats.json`'s discovery object (nil while the page does not answer).
    private func discoveryStats(_ port: Int) -> [String: Any]? {
        guard let body = try? HTTPProbe.get(port: port, path: "/stats.json", timeout: 2),
              let object = try? JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any] else { return nil }
        return object["discovery"] as? [String: Any]
    }

    private func source(_ port: Int) -> String? {
        discoveryStats(port)?["source"] as? String
    }

    /// A put or delete through etcd's JSON gateway: one HTTP request on the test's own socket, so
    /// a burst of them fits in well under a second (an etcdctl process each would not).
    private func etcd(_ port: Int, _ operation: String, key: String, value: String? = nil) throws {
        func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
        var body = "{\"key\":\"\(base64(key))\""
        if let value { body += ",\"value\":\"\(base64(value))\"" }
        body += "}"
        let request = "POST /v3/kv/\(operation) HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + "Content-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        let answer = try HTTPProbe.exchange(port: port, request: Array(request.utf8))
        guard answer.hasPrefix("HTTP/1.1 200") else { throw FixtureError("etcd \(operation) \(key): \(answer.prefix(300))") }
    }

    private func wait(_ what: String, timeout: Double = 30, _ condition: () -> Bool) throws {
        if waitUntil(timeout: timeout, interval: 0.05, condition) == nil { throw FixtureError("timed out waiting for \(what)") }
    }

    func testFollowsEtcdServesFromTheFileWithoutEtcdAndEtcdTakesOverAgain() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let one = try startWhoami(id: "one"), two = try startWhoami(id: "two"), three = try startWhoami(id: "three")
        let listen = try freeLoopbackPort(), statsPort = try freeLoopbackPort()
        let path = try temporaryDirectory() + "/state"
        let etcdPort = etcd.members[0].clientPort
        try self.etcd(etcdPort, "put", key: "/backends/whoami/one", value: instance(one, listen: listen))

        let first = try discover(etcd: etcd.endpoints, stateFile: path, statsPort: statsPort)
        XCTAssertTrue(first.waitForStandardError(containing: "watching the registry", timeout: 15), first.standardError)
        try wait("the file with 'one'") { backendNames(saved(path)) == ["one"] }
        XCTAssertFalse(first.standardError.contains("serving from the state file"))

        // The file follows a change.
        try self.etcd(etcdPort, "put", key: "/backends/whoami/two", value: instance(two, listen: listen))
        try wait("the file with 'one' and 'two'") { backendNames(saved(path)) == ["one", "two"] }

        // A burst of 50 changes: at most two writes per second of burst, and the last state kept.
        try wait("the stats page") { discoveryStats(statsPort)?["stateFileWrites"] != nil }
        let before = try writes(statsPort)
        let started = monotonicSeconds()
        for round in 1...50 {
            try self.etcd(etcdPort, "put", key: "/backends/whoami/burst", value: "{\"host\":\"127.0.0.1\",\"port\":\(40_000 + round),\"listen\":\(listen)}")
        }
        let seconds = monotonicSeconds() - started
        try wait("the burst's last state in the file") {
            saved(path)?.table.frontends.first?.backends.contains { $0.name == "burst" && $0.address.port == 40_050 } == true
        }
        sleep(seconds: 1.2) // a write still due would come within a second
        let burstWrites = try writes(statsPort) - before
        print("state file: \(burstWrites) writes for a burst of 50 changes in \(seconds) s")
        XCTAssertGreaterThanOrEqual(burstWrites, 1)
        XCTAssertLessThanOrEqual(burstWrites, 2 + Int(seconds), "\(burstWrites) writes for 50 changes in \(seconds) s")
        try self.etcd(etcdPort, "deleterange", key: "/backends/whoami/burst")
        try wait("the file without the burst") { backendNames(saved(path)) == ["one", "two"] }

        first.signal(SIGTERM)
        XCTAssertEqual(first.waitForExit(timeout: 15), .exited(0), first.standardError)

        // Meanwhile the registry changes: 'one' leaves, 'three' comes. Then etcd stops.
        try self.etcd(etcdPort, "deleterange", key: "/backends/whoami/one")
        try self.etcd(etcdPort, "put", key: "/backends/whoami/three", value: instance(three, listen: listen))
        etcd.members[0].stop()

        // Without etcd, Berth serves the file's table: 'one' and 'two'.
        let second = try discover(etcd: etcd.endpoints, stateFile: path, statsPort: statsPort)
        XCTAssertTrue(second.waitForStandardError(containing: "serving from the state file", timeout: 30), second.standardError)
        XCTAssertTrue(second.standardError.contains("revision"), second.standardError)
        try wait("answers from 'one' and 'two' through the proxy") { Set(answers(listen, count: 4)) == ["one", "two"] }
        XCTAssertEqual(source(statsPort), "state file")
        XCTAssertTrue(try HTTPProbe.get(port: statsPort, path: "/").contains("state file"))

        // etcd comes back with the changed registry: its view replaces the file's.
        try etcd.members[0].start()
        XCTAssertTrue(second.waitForStandardError(containing: "etcd answered", timeout: 60), second.standardError)
        try wait("new connections on 'two' and 'three' only") { Set(answers(listen, count: 6)) == ["two", "three"] }
        XCTAssertEqual(source(statsPort), "etcd")
        try wait("the file with etcd's view") { backendNames(saved(path)) == ["two", "three"] }
        second.signal(SIGTERM)
        XCTAssertEqual(second.waitForExit(timeout: 15), .exited(0), second.standardError)
    }

    private func writes(_ statsPort: Int) throws -> Int {
        guard let writes = discoveryStats(statsPort)?["stateFileWrites"] as? Int else { throw FixtureError("no stateFileWrites on the stats page") }
        return writes
    }

    /// A state file that names one whoami on `listen`.
    private func writeStateFile(_ path: String, backend: ListeningChild, listen: Int) throws -> [UInt8] {
        let table = RoutingTable(revision: 77, frontends: [
            Frontend(name: "whoami", listen: try SocketAddress(parsing: "127.0.0.1:\(listen)"),
                     backends: [Backend(name: "one", address: try SocketAddress(parsing: backend.address))]),
        ])
        let bytes = StateFile.encode(SavedState(table: table, savedAt: Int64(Date().timeIntervalSince1970) - 90))
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return bytes
    }

    /// etcd at an address that accepts and never answers, and at a port where nothing listens.
    func testEtcdThatNeverAnswersOrRefusesServesFromTheFile() throws {
        let one = try startWhoami(id: "one")
        let silent = try SilentListener(host: "127.0.0.1", port: 0)
        defer { silent.stop() }
        let dead = try freeLoopbackPort()
        for etcd in ["127.0.0.1:\(silent.port)", "127.0.0.1:\(dead)"] {
            let listen = try freeLoopbackPort(), statsPort = try freeLoopbackPort()
            let path = try temporaryDirectory() + "/state"
            _ = try writeStateFile(path, backend: one, listen: listen)
            let berth = try discover(etcd: etcd, stateFile: path, statsPort: statsPort)
            XCTAssertTrue(berth.waitForStandardError(containing: "serving from the state file", timeout: 60), "\(etcd): \(berth.standardError)")
            // The file's age (saved 90 s before the start, plus the wait for etcd) and revision.
            let ages = berth.standardError.split(separator: "(saved ").dropFirst().compactMap { Int($0.prefix { $0.isNumber }) }
            XCTAssertTrue(ages.contains { $0 >= 90 }, berth.standardError)
            XCTAssertTrue(berth.standardError.contains("s ago, revision 77"), berth.standardError)
            try wait("answers from 'one' (etcd \(etcd))") { answers(listen, count: 1) == ["one"] }
            try wait("the stats page's source") { source(statsPort) == "state file" }
            berth.signal(SIGTERM)
            XCTAssertEqual(berth.waitForExit(timeout: 15), .exited(0), berth.standardError)
        }
    }

    /// A truncated file, a corrupted one and garbage are each reported and never served; a
    /// missing one is a first start.
    func testDamagedFilesAreReportedAndNotServed() throws {
        let one = try startWhoami(id: "one")
        let dead = try freeLoopbackPort()
        let directory = try temporaryDirectory()
        let listen = try freeLoopbackPort()
        let good = try writeStateFile(directory + "/good", backend: one, listen: listen)
        var flipped = good
        flipped[good.count - 10] ^= 0x01
        let damaged: [(String, [UInt8]?)] = [
            ("truncated", Array(good.prefix(good.count - 7))), ("corrupted", flipped),
            ("garbage", Array("not a state file\n".utf8)), ("missing", nil),
        ]
        for (name, bytes) in damaged {
            let path = directory + "/" + name
            if let bytes { try Data(bytes).write(to: URL(fileURLWithPath: path)) }
            let berth = try discover(etcd: "127.0.0.1:\(dead)", stateFile: path, statsPort: try freeLoopbackPort())
            let report = bytes == nil ? "does not exist yet" : "ignored, not served"
            XCTAssertTrue(berth.waitForStandardError(containing: report, timeout: 60), "\(name): \(berth.standardError)")
            XCTAssertTrue(berth.waitForStandardError(containing: "watching /backends/", timeout: 10), berth.standardError)
            XCTAssertFalse(berth.standardError.contains("serving from the state file"), berth.standardError)
            XCTAssertFalse(HTTPProbe.isListening(port: listen), "\(name): the file's service must not be served")
            berth.signal(SIGTERM)
            XCTAssertEqual(berth.waitForExit(timeout: 15), .exited(0), berth.standardError)
            XCTAssertEqual(FileManager.default.contents(atPath: path).map(Array.init), bytes, "\(name): the file was left as it was")
        }
    }
}
