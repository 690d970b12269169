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
                                    (["--linger", "soon"], "linger"), (["--relist-jitter", "soon"], "relist-jitter")] {
            let (ended, _, error) = try runBerth(["discover"] + arguments)
            XCTAssertEqual(ended, .exited(64), "\(arguments): \(error)")
            XCTAssertTrue(error.contains(reason), "\(arguments): \(error)")
        }
    }
}
