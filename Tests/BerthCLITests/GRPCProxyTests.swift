import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// Berth through etcd's gRPC proxy (`etcd grpc-proxy start`), as a fleet would run it: the
/// registrar's lease kept alive through the proxy (the proxy cancels a keep-alive stream whose
/// client half-closed before its answer), and discovery's listing and watch (the proxy answers no
/// watch progress request).
final class GRPCProxyTests: BerthTestCase {
    func testRegisterAndDiscoverThroughTheGRPCProxy() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let proxyPort = try freeLoopbackPort()
        let proxy = try startProxy(etcd: etcd, port: proxyPort)
        let whoami = try startWhoami(id: "proxied")
        let listen = try freeLoopbackPort()
        let endpoint = "http://127.0.0.1:\(proxyPort)"
        let register = try launch(BerthBinary.path, ["register", "--etcd", endpoint, "--no-docker", "--ttl", "2s",
                                                     "--static", "web=127.0.0.1:\(whoami.port)@\(listen)"])
        XCTAssertTrue(register.waitForStandardError(containing: "granted", timeout: 10), register.standardError)
        // Three TTLs later the key is still there, under a live lease: the keep-alives got through.
        sleep(seconds: 6)
        let keys = try etcd.etcdctl(["get", "--prefix", "/backends/web/", "--keys-only"])
        XCTAssertTrue(keys.contains("/backends/web/127.0.0.1:\(whoami.port)"), "the registration expired: \(keys)\n\(register.standardError)")
        XCTAssertFalse(register.standardError.contains("keep-alive failed"), register.standardError)

        let discover = try launch(BerthBinary.path, ["discover", "--etcd", endpoint, "--bind", "127.0.0.1", "--workers", "1", "--stats", "off"])
        XCTAssertTrue(discover.waitForStandardError(containing: "watching the registry", timeout: 10), discover.standardError)
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: listen, timeout: 1))?.contains("proxied") == true },
                        "not routed through the proxy's listing: \(discover.standardError)")
        // The proxy answers no progress request: a quiet watch must still stay as it is (not
        // be taken for a silent one and opened again every few seconds), ...
        sleep(seconds: 9)
        XCTAssertFalse(discover.standardError.contains("etcd endpoint failed"), "the quiet watch was reopened: \(discover.standardError)")
        // ... and a change after the quiet spell is no outage's: the instance goes away at once
        // (an expiry after an outage would be held for 5 s).
        register.signal(SIGTERM)
        XCTAssertEqual(register.waitForExit(timeout: 10), .exited(0), register.standardError)
        XCTAssertTrue(register.standardError.contains("revoked"), register.standardError)
        XCTAssertNotNil(waitUntil(timeout: 3) { (try? HTTPProbe.get(port: listen, timeout: 1)) == nil },
                        "the revoked instance is still served")
        XCTAssertFalse(discover.standardError.contains("held"), discover.standardError)
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
        proxy.signal(SIGTERM)
        _ = proxy.waitForExit(timeout: 10)
    }

    /// The proxy restarts while etcd compacts past what a watch through it had seen: the watch,
    /// resumed on the new proxy, must find out and list again. (A restarted proxy can create a
    /// watch at a compacted revision and never answer it; the resumed watch reads at its revision
    /// first.)
    func testAWatchResumedThroughARestartedProxyPastACompactionListsAgain() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let proxyPort = try freeLoopbackPort()
        var proxy = try startProxy(etcd: etcd, port: proxyPort)
        let first = try startWhoami(id: "before")
        let second = try startWhoami(id: "after")
        let listen = try freeLoopbackPort()
        _ = try etcd.etcdctl(["put", "/backends/web/a", "{\"host\":\"127.0.0.1\",\"port\":\(first.port),\"listen\":\(listen)}"])
        let discover = try launch(BerthBinary.path, ["discover", "--etcd", "http://127.0.0.1:\(proxyPort)", "--bind", "127.0.0.1",
                                                     "--workers", "1", "--stats", "off"])
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: listen, timeout: 1))?.contains("before") == true },
                        "not routed through the proxy: \(discover.standardError)")

        proxy.signal(SIGKILL)
        _ = proxy.waitForExit(timeout: 10)
        _ = try etcd.etcdctl(["put", "/backends/web/b", "{\"host\":\"127.0.0.1\",\"port\":\(second.port),\"listen\":\(listen)}"])
        _ = try etcd.etcdctl(["del", "/backends/web/a"])
        _ = try etcd.etcdctl(["put", "/backends/other/x", "127.0.0.1:1"])
        let status = try etcd.etcdctl(["endpoint", "status", "--write-out", "fields"])
        let revision = status.split(separator: "\n").first { $0.contains("\"Revision\"") }?.split(separator: ":").last
            .map { $0.trimmingCharacters(in: .whitespaces) } ?? ""
        XCTAssertFalse(revision.isEmpty, status)
        _ = try etcd.etcdctl(["compact", revision])
        proxy = try startProxy(etcd: etcd, port: proxyPort)

        XCTAssertNotNil(waitUntil(timeout: 15) { (try? HTTPProbe.get(port: listen, timeout: 1))?.contains("after") == true },
                        "the resumed watch did not catch up past the compaction: \(discover.standardError)")
        XCTAssertTrue(discover.standardError.contains("listing again"), discover.standardError)
        XCTAssertTrue(discover.standardError.contains("registry listed again"), discover.standardError)
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
        proxy.signal(SIGTERM)
        _ = proxy.waitForExit(timeout: 10)
    }

    /// `--services` through the proxy: the host's services are listed in one transaction and
    /// watched on one stream, a watch each; when the proxy is killed and started again while
    /// both services change, each watch resumes from its own revision and both changes arrive.
    func testAHostsServicesShareOneStreamThroughTheProxyAcrossItsRestart() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let proxyPort = try freeLoopbackPort()
        var proxy = try startProxy(etcd: etcd, port: proxyPort)
        let alpha = try startWhoami(id: "alpha"), beta = try startWhoami(id: "beta"), betaTwo = try startWhoami(id: "beta-two")
        let alphaListen = try freeLoopbackPort(), betaListen = try freeLoopbackPort()
        func record(_ port: UInt16, _ listen: Int) -> String { "{\"host\":\"127.0.0.1\",\"port\":\(port),\"listen\":\(listen)}" }
        try etcd.etcdctl(["put", "/backends/alpha/1", record(alpha.port, alphaListen)])
        try etcd.etcdctl(["put", "/backends/beta/1", record(beta.port, betaListen)])
        let discover = try launch(BerthBinary.path, ["discover", "--etcd", "http://127.0.0.1:\(proxyPort)", "--bind", "127.0.0.1",
                                                     "--workers", "1", "--stats", "off", "--services", "alpha,beta"])
        XCTAssertNotNil(waitUntil(timeout: 10) {
            (try? HTTPProbe.get(port: alphaListen, timeout: 1))?.contains("alpha") == true
                && (try? HTTPProbe.get(port: betaListen, timeout: 1))?.contains("beta") == true
        }, "not routed through the proxy: \(discover.standardError)")
        // (The table can be routed before the stream's log line is written.)
        XCTAssertTrue(discover.waitForStandardError(containing: "ranges=3", timeout: 10), discover.standardError)

        proxy.signal(SIGKILL)
        _ = proxy.waitForExit(timeout: 10)
        try etcd.etcdctl(["put", "/backends/beta/2", record(betaTwo.port, betaListen)])
        try etcd.etcdctl(["del", "/backends/beta/1"])
        try etcd.etcdctl(["put", "/backends/other/1", record(beta.port, alphaListen)])
        proxy = try startProxy(etcd: etcd, port: proxyPort)
        XCTAssertNotNil(waitUntil(timeout: 15) { (try? HTTPProbe.get(port: betaListen, timeout: 1))?.contains("beta-two") == true },
                        "beta's change made while the proxy was down did not arrive: \(discover.standardError)")
        // alpha's watch resumed too: a change to it after the restart arrives.
        try etcd.etcdctl(["del", "/backends/alpha/1"])
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: alphaListen, timeout: 1)) == nil },
                        "alpha's delete did not arrive: \(discover.standardError)")
        for _ in 0..<4 { XCTAssertEqual(try? HTTPProbe.get(port: betaListen, timeout: 1).contains("beta-two"), true) }
        XCTAssertFalse(discover.standardError.contains("registry listed again"), "no compaction: resumed, not listed again\n\(discover.standardError)")
        discover.signal(SIGTERM)
        XCTAssertEqual(discover.waitForExit(timeout: 10), .exited(0), discover.standardError)
        proxy.signal(SIGTERM)
        _ = proxy.waitForExit(timeout: 10)
    }

    /// etcd with auth on, and a user granted read and write on the registry's prefix and nothing
    /// else (the least an operator would grant): registration (lease, put, keep-alives),
    /// listing and watch all work through the proxy, which passes the user's token on.
    func testAUserGrantedOnlyTheRegistryWorksThroughTheProxy() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        try etcd.etcdctl(["user", "add", "root", "--new-user-password=rootpw", "--interactive=false"])
        try etcd.etcdctl(["user", "grant-role", "root", "root"])
        try etcd.etcdctl(["role", "add", "berth"])
        try etcd.etcdctl(["role", "grant-permission", "berth", "--prefix=true", "readwrite", "/backends/"])
        try etcd.etcdctl(["user", "add", "berth", "--new-user-password=pw", "--interactive=false"])
        try etcd.etcdctl(["user", "grant-role", "berth", "berth"])
        try etcd.etcdctl(["auth", "enable"])
        let proxyPort = try freeLoopbackPort()
        let proxy = try startProxy(etcd: etcd, port: proxyPort)
        let first = try startWhoami(id: "registered")
        let second = try startWhoami(id: "put-later")
        let listen = try freeLoopbackPort()
        let endpoint = "http://127.0.0.1:\(proxyPort)"
        let credentials = ["ETCD_USERNAME": "berth", "ETCD_PASSWORD": "pw"]
        let register = try launch(BerthBinary.path, ["register", "--etcd", endpoint, "--no-docker", "--ttl", "2s",
                                                     "--static", "web=127.0.0.1:\(first.port)@\(listen)"], environment: credentials)
        XCTAssertTrue(register.waitForStandardError(containing: "granted", timeout: 10), register.standardError)
        let discover = try launch(BerthBinary.path, ["discover", "--etcd", endpoint, "--bind", "127.0.0.1", "--workers", "1", "--stats", "off"],
                                  environment: credentials)
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: listen, timeout: 1))?.contains("registered") == true },
                        "not routed: \(discover.standardError)")
        // Three TTLs on, the registration lives (its keep-alives got through), and a change
        // made meanwhile reaches the routing by the watch.
        sleep(seconds: 6)
        let keys = try etcd.etcdctl(["get", "--prefix", "/backends/web/", "--keys-only"], user: "root:rootpw")
        XCTAssertTrue(keys.contains("/backends/web/127.0.0.1:\(first.port)"), "the registration expired: \(keys)\n\(register.standardError)")
        try etcd.etcdctl(["put", "/backends/web/later", "{\"host\":\"127.0.0.1\",\"port\":\(second.port),\"listen\":\(listen)}"],
                         user: "root:rootpw")
        XCTAssertNotNil(waitUntil(timeout: 5) { (try? HTTPProbe.get(port: listen, timeout: 1))?.contains("put-later") == true },
                        "the watch through the proxy did not deliver the put: \(discover.standardError)")
        XCTAssertFalse(register.standardError.contains("keep-alive failed"), register.standardError)
        XCTAssertFalse(discover.standardError.contains("permission denied"), discover.standardError)
        for process in [discover, register] {
            process.signal(SIGTERM)
            XCTAssertEqual(process.waitForExit(timeout: 10), .exited(0), process.standardError)
        }
        proxy.signal(SIGTERM)
        _ = proxy.waitForExit(timeout: 10)
    }

    private func startProxy(etcd: EtcdFixture, port: Int) throws -> ChildProcess {
        let proxy = try launch(EtcdFixture.etcdPath, ["grpc-proxy", "start", "--endpoints", "127.0.0.1:\(etcd.members[0].clientPort)",
                                                      "--listen-addr", "127.0.0.1:\(port)"])
        XCTAssertNotNil(waitUntil(timeout: 10) {
            guard case .success(let fd) = TestSocket.connect(UInt16(port), timeout: 1) else { return false }
            Glibc.close(fd)
            return true
        }, "the gRPC proxy did not listen: \(proxy.standardError)")
        return proxy
    }
}
