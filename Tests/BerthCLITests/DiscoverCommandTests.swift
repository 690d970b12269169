import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `berth discover` as a child process, against a real etcd.
final class DiscoverCommandTests: BerthTestCase {
    func testRoutesWhatEtcdctlPutsAndStopsOnSigterm() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let one = try startWhoami(id: "one"), two = try startWhoami(id: "two")
        let listen = try freeLoopbackPort()
        let discover = try launch(BerthBinary.path, ["discover", "--bind", "127.0.0.1", "--workers", "1"],
                                  environment: ["ETCD_HOST": "127.0.0.1:\(etcd.members[0].clientPort)"])
        XCTAssertTrue(discover.waitForStandardError(containing: "watching the registry", timeout: 10), discover.standardError)
        for (name, backend) in [("one", one), ("two", two)] {
            try etcd.etcdctl(["put", "/backends/whoami/\(name)", "{\"host\":\"127.0.0.1\",\"port\":\(backend.port),\"listen\":\(listen)}"])
        }
        var answers: [String] = []
        let deadline = Date().addingTimeInterval(5)
        while answers.count < 4 && Date() < deadline {
            if let body = try? HTTPProbe.get(port: listen, timeout: 1), body.contains("I'm") {
                answers.append(body.contains("one") ? "one" : "two")
                if answers.count == 1 && !Set(answers).isSubset(of: ["one", "two"]) { break }
            } else {
                usleep(10_000)
            }
        }
        // Both instances registered: the answers alternate (the first may come before the second put).
        XCTAssertEqual(answers.count, 4, "answers: \(answers)")
        XCTAssertEqual(Array(answers.suffix(2)).sorted(), ["one", "two"], "answers: \(answers)")
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
    }

    /// `--services`: only those services are listed, watched and served; etcd sends this host
    /// no watch event about the others (its `etcd_debugging_mvcc_events_total` counts the
    /// events it sends to watchers), only their `_config` keys.
    func testServicesFilterListsAndWatchesOnlyThoseServices() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let alpha = try startWhoami(id: "alpha"), beta = try startWhoami(id: "beta")
        let alphaListen = try freeLoopbackPort(), betaListen = try freeLoopbackPort()
        try etcd.etcdctl(["put", "/backends/alpha/1", "{\"host\":\"127.0.0.1\",\"port\":\(alpha.port),\"listen\":\(alphaListen)}"])
        try etcd.etcdctl(["put", "/backends/beta/1", "{\"host\":\"127.0.0.1\",\"port\":\(beta.port),\"listen\":\(betaListen)}"])
        let discover = try launch(BerthBinary.path, ["discover", "--etcd", etcd.endpoints, "--bind", "127.0.0.1", "--workers", "1",
                                                     "--stats", "off"], environment: ["BERTH_SERVICES": "alpha, gamma"])
        XCTAssertTrue(discover.waitForStandardError(containing: "watching the registry", timeout: 10), discover.standardError)
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: alphaListen, timeout: 1))?.contains("alpha") == true },
                        discover.standardError)
        XCTAssertNil(try? HTTPProbe.get(port: betaListen, timeout: 1), "beta is not a service of this host")
        // Three watches: alpha's keys, gamma's, and every _config; all on one stream.
        let watchers = { self.etcdMetric(etcd, "etcd_debugging_mvcc_watcher_total") }
        XCTAssertNotNil(waitUntil(timeout: 10) { watchers() == 3 }, "watchers: \(watchers().map(String.init) ?? "-")")
        XCTAssertEqual(etcdMetric(etcd, "etcd_debugging_mvcc_watch_stream_total"), 1)
        let events = { self.etcdMetric(etcd, "etcd_debugging_mvcc_events_total") ?? -1 }
        let before = events()
        for index in 0..<10 {
            try etcd.etcdctl(["put", "/backends/beta/\(index + 2)", "{\"host\":\"127.0.0.1\",\"port\":\(beta.port),\"listen\":\(betaListen)}"])
        }
        XCTAssertEqual(events(), before, "etcd sent this host events of a service it does not watch")
        // A change to alpha reaches it: a second instance (beta's backend) joins the rotation.
        try etcd.etcdctl(["put", "/backends/alpha/2", "{\"host\":\"127.0.0.1\",\"port\":\(beta.port),\"listen\":\(alphaListen)}"])
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: alphaListen, timeout: 1))?.contains("beta") == true },
                        "alpha's new instance was not routed")
        XCTAssertEqual(events(), before + 1)
        XCTAssertNil(try? HTTPProbe.get(port: betaListen, timeout: 1))
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
    }

    /// A counter or gauge from the first member's /metrics.
    private func etcdMetric(_ etcd: EtcdFixture, _ name: String) -> Int? {
        guard let text = try? HTTPProbe.get(port: etcd.members[0].clientPort, path: "/metrics", timeout: 2) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(name + " ") {
            return Double(line.split(separator: " ").last ?? "").map { Int($0) }
        }
        return nil
    }

    func testWrongEtcdPasswordIsAClearErrorAtStartUp() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        try etcd.etcdctl(["user", "add", "root", "--new-user-password=secret", "--interactive=false"])
        try etcd.etcdctl(["user", "grant-role", "root", "root"])
        try etcd.etcdctl(["auth", "enable"])
        let (ended, _, error) = try runBerth(["discover", "--etcd", etcd.endpoints, "--bind", "127.0.0.1",
                                              "--etcd-user", "root", "--etcd-password", "wrong"], timeout: 20)
        XCTAssertEqual(ended, .exited(1), error)
        XCTAssertTrue(error.contains("authentication failed"), error)
        let right = try launch(BerthBinary.path, ["discover", "--etcd", etcd.endpoints, "--bind", "127.0.0.1", "--workers", "1"],
                               environment: ["ETCD_USERNAME": "root", "ETCD_PASSWORD": "secret"])
        XCTAssertTrue(right.waitForStandardError(containing: "watching the registry", timeout: 10), right.standardError)
        right.signal(SIGTERM)
        XCTAssertEqual(right.waitForExit(timeout: 10), .exited(0))
    }

    func testBadEtcdFlagsAreUsageErrors() throws {
        for (arguments, reason) in [(["--etcd", "ftp://a:1"], "scheme"), (["--prefix", "backends"], "must start with '/'"),
                                    (["--etcd-user", "root"], "go together"), (["--bind", "1.2.3"], "--bind"),
                                    (["--linger", "soon"], "linger"), (["--relist-jitter", "soon"], "relist-jitter"),
                                    (["--services", "a,,b"], "--services"), (["--services", ""], "--services"),
                                    (["--services", "a/b"], "--services")] {
            let (ended, _, error) = try runBerth(["discover"] + arguments)
            XCTAssertEqual(ended, .exited(64), "\(arguments): \(error)")
            XCTAssertTrue(error.contains(reason), "\(arguments): \(error)")
        }
    }
}
