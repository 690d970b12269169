import Foundation
import Glibc
import XCTest

/// `berth proxy --stats/--stats-auth` and `berth ctl`, through the binary.
final class StatsCommandTests: BerthTestCase {
    private let auth = "Authorization: Basic YWRtaW46cHc=\r\n"  // admin:pw

    private func statsGet(_ port: UInt16, _ path: String, headers: String = "") -> HTTPResponse? {
        guard case .success(let fd) = TestSocket.connect(port, timeout: 5) else { return nil }
        defer { Glibc.close(fd) }
        guard TestSocket.sendAll(fd, HTTPExchange.request(path, headers: headers + "Connection: close\r\n")) else { return nil }
        return HTTPExchange.readResponses(fd, count: 1, timeout: 5).responses.first
    }

    func testCtlDrainsListsAndEnablesThroughTheAdminAPI() throws {
        let web0 = try startWhoami(id: "web0")
        let web1 = try startWhoami(id: "web1")
        let statsPort = try TestSocket.freePort()
        let proxy = try startProxy(backends: [web0.address, web1.address],
                                   options: ["--stats", "127.0.0.1:\(statsPort)", "--stats-auth", "admin:pw"])
        XCTAssertTrue(proxy.process.standardError.contains("stats on http://127.0.0.1:\(statsPort)/"), proxy.process.standardError)
        XCTAssertEqual(statsGet(statsPort, "/")?.status, 401)
        XCTAssertEqual(statsGet(statsPort, "/", headers: auth)?.status, 200)
        XCTAssertEqual(statsGet(statsPort, "/healthz")?.status, 200)

        let target = ["--stats", "http://127.0.0.1:\(statsPort)"]
        let (listed, listing, _) = try runBerth(["ctl", "list", "--auth", "admin:pw"] + target)
        XCTAssertEqual(listed, .exited(0))
        XCTAssertTrue(listing.contains("SERVICE"), listing)
        XCTAssertTrue(listing.split(separator: "\n").contains { $0.hasPrefix("proxy ") && $0.contains(web0.address) }, listing)
        XCTAssertTrue(listing.contains("no check"), listing)

        let (refused, _, refusal) = try runBerth(["ctl", "drain", "proxy", web0.address] + target)
        XCTAssertEqual(refused, .exited(1))
        XCTAssertTrue(refusal.contains("authentication required"), refusal)

        let (drained, said, _) = try runBerth(["ctl", "drain", "proxy", web0.address, "--auth", "admin:pw"] + target)
        XCTAssertEqual(drained, .exited(0))
        XCTAssertTrue(said.contains("draining"), said)
        for _ in 0..<6 {
            XCTAssertEqual(HTTPExchange.get(proxy.port)?.text, "I'm web1\n", "new connections avoid the drained backend")
        }
        let (_, afterDrain, _) = try runBerth(["ctl", "list", "--auth", "admin:pw"] + target)
        XCTAssertTrue(afterDrain.split(separator: "\n").contains { $0.contains(web0.address) && $0.contains("DRAIN") }, afterDrain)

        let (unknown, _, unknownError) = try runBerth(["ctl", "maint", "proxy", "127.0.0.1:1", "--auth", "admin:pw"] + target)
        XCTAssertEqual(unknown, .exited(1))
        XCTAssertTrue(unknownError.contains("no backend '127.0.0.1:1'"), unknownError)

        // The environment, as in a container: the same variables as the proxy's.
        let (enabled, _, _) = try runBerth(["ctl", "enable", "proxy", web0.address],
                                           environment: ["BERTH_STATS": "127.0.0.1:\(statsPort)", "BERTH_STATS_AUTH": "admin:pw"])
        XCTAssertEqual(enabled, .exited(0))
        var seen = Set<String>()
        for _ in 0..<4 { seen.insert(HTTPExchange.get(proxy.port)?.text ?? "") }
        XCTAssertEqual(seen, ["I'm web0\n", "I'm web1\n"])
    }

    func testStatsFromTheEnvironmentAndOff() throws {
        let web0 = try startWhoami(id: "web0")
        let statsPort = try TestSocket.freePort()
        let proxy = try startProxy(backends: [web0.address], environment: ["BERTH_STATS": "127.0.0.1:\(statsPort)"])
        XCTAssertTrue(proxy.process.standardError.contains("admin API off"), proxy.process.standardError)
        XCTAssertEqual(statsGet(statsPort, "/;csv")?.status, 200, "no credentials needed without --stats-auth")
        let quiet = try startProxy(backends: [web0.address], options: ["--stats", "off"])
        XCTAssertFalse(quiet.process.standardError.contains("stats"), quiet.process.standardError)
    }

    func testBadStatsFlagsAreUsageErrors() throws {
        for arguments in [["--stats", "nowhere"], ["--stats-auth", "nocolon"], ["--stats-auth", ":pw"]] {
            let (ended, _, error) = try runBerth(["proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1"] + arguments)
            XCTAssertEqual(ended, .exited(64), "\(arguments)")
            XCTAssertEqual(error.split(separator: "\n").count, 1, "one line: \(error)")
        }
        let (missing, _, _) = try runBerth(["ctl", "drain", "proxy"])
        XCTAssertEqual(missing, .exited(64))
        let (badURL, _, _) = try runBerth(["ctl", "list", "--stats", "https://x:1"])
        XCTAssertEqual(badURL, .exited(64))
    }

    /// An explicit --stats address that cannot be bound is fatal (exit 1), before serving.
    func testStatsAddressInUseIsFatal() throws {
        let (listener, port) = try TestSocket.listen()
        defer { Glibc.close(listener) }
        let (ended, _, error) = try runBerth(["proxy", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:1",
                                              "--stats", "127.0.0.1:\(port)"])
        XCTAssertEqual(ended, .exited(1))
        XCTAssertTrue(error.contains("cannot listen on 127.0.0.1:\(port) for stats"), error)
    }
}
