import BerthSystem
import BerthWhoami
import Foundation
import Glibc
import XCTest

/// `/;csv` against a real HAProxy 2.6 started here with the same service and servers.
final class HAProxyCSVTests: XCTestCase {
    /// One parsed CSV: the header's names and each row as name → value.
    struct CSV {
        var columns: [String]
        var rows: [[String: String]]
        var fieldCounts: [Int]

        init(_ text: String) {
            let lines = text.split(separator: "\n").map(String.init)
            var header = lines.first ?? ""
            if header.hasPrefix("# ") { header.removeFirst(2) }
            columns = header.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            if columns.last == "" { columns.removeLast() }
            var rows: [[String: String]] = []
            var counts: [Int] = []
            for line in lines.dropFirst() {
                var fields = line.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
                if fields.last == "" { fields.removeLast() }
                counts.append(fields.count)
                rows.append(Dictionary(zip(columns, fields), uniquingKeysWith: { first, _ in first }))
            }
            self.rows = rows
            fieldCounts = counts
        }

        func row(_ proxy: String, _ server: String) -> [String: String]? {
            rows.first { $0["pxname"] == proxy && $0["svname"] == server }
        }
    }

    func testHeaderEqualsHAProxysAndValuesMove() throws {
        guard let haproxy = Tool.find(["haproxy"]) else { throw XCTSkip("haproxy is not installed (scripts/test installs it)") }
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"])])
        defer { stack.stop() }
        let directory = NSTemporaryDirectory() + "berth-haproxy-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let statsPort = try StatsStack.unusedAddress().port
        let frontPort = try StatsStack.unusedAddress().port
        let servers = stack.whoamis.map { "  server \($0.identity) \($0.address)" }.joined(separator: "\n")
        let configuration = """
            global
              maxconn 100
            defaults
              mode tcp
              timeout connect 1s
              timeout client 5s
              timeout server 5s
            listen stats
              bind 127.0.0.1:\(statsPort)
              mode http
              stats enable
              stats uri /
            frontend web
              bind 127.0.0.1:\(frontPort)
              default_backend web
            backend web
              balance roundrobin
            \(servers)

            """
        try configuration.write(toFile: directory + "/haproxy.cfg", atomically: true, encoding: .utf8)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: haproxy)
        process.arguments = ["-db", "-f", directory + "/haproxy.cfg"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer {
            // Stopped by its pid: SIGTERM, then SIGKILL if it lingers.
            kill(process.processIdentifier, SIGTERM)
            if !eventually(timeout: 3, { !process.isRunning }) { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        let haproxyStats = try SocketAddress(parsing: "127.0.0.1:\(statsPort)")
        XCTAssertTrue(eventually(timeout: 10) { (try? HTTP.request(haproxyStats, "GET", "/;csv").status) == 200 }, "haproxy answers")

        let reference = CSV(try HTTP.request(haproxyStats, "GET", "/;csv").body)
        let ours = CSV(try HTTP.request(stack.statsAddress, "GET", "/;csv").body)
        // HAProxy's standard columns end at agg_check_status; after "-" come its statistics
        // modules (ssl, h2, h1), which Berth does not have.
        let shared = Array(reference.columns.prefix { $0 != "-" })
        XCTAssertEqual(shared.count, 103)
        XCTAssertEqual(ours.columns, shared, "the header, column by column")
        XCTAssertEqual(Set(ours.fieldCounts), [shared.count], "every row has every column")
        let haproxyRows = reference.rows.filter { $0["pxname"] == "web" }.map { $0["svname"]! }
        let berthRows = ours.rows.filter { $0["pxname"] == "web" }.map { $0["svname"]! }
        XCTAssertEqual(berthRows, haproxyRows, "FRONTEND, one row per server, BACKEND, in HAProxy's order")
        for server in ["a", "b"] {
            XCTAssertEqual(ours.row("web", server)?["status"], reference.row("web", server)?["status"], "status of \(server)")
            XCTAssertEqual(ours.row("web", server)?["type"], reference.row("web", server)?["type"])
            XCTAssertEqual(ours.row("web", server)?["weight"], reference.row("web", server)?["weight"])
        }
        XCTAssertEqual(ours.row("web", "FRONTEND")?["status"], "OPEN")
        XCTAssertEqual(ours.row("web", "BACKEND")?["status"], reference.row("web", "BACKEND")?["status"])

        // The same 10 sessions through each: stot, bin and bout move alike.
        for _ in 0..<10 {
            _ = try HTTP.whoami(stack.frontends["web"]!)
            _ = try HTTP.whoami(try SocketAddress(parsing: "127.0.0.1:\(frontPort)"))
        }
        XCTAssertTrue(eventually(timeout: 3) {
            let after = CSV((try? HTTP.request(stack.statsAddress, "GET", "/;csv").body) ?? "")
            return after.row("web", "FRONTEND")?["scur"] == "0"
        })
        let referenceAfter = CSV(try HTTP.request(haproxyStats, "GET", "/;csv").body)
        let oursAfter = CSV(try HTTP.request(stack.statsAddress, "GET", "/;csv").body)
        for row in ["FRONTEND", "a", "b", "BACKEND"] {
            XCTAssertEqual(oursAfter.row("web", row)?["stot"], referenceAfter.row("web", row)?["stot"], "stot of \(row)")
            XCTAssertEqual(oursAfter.row("web", row)?["bin"], referenceAfter.row("web", row)?["bin"], "bin of \(row)")
            XCTAssertEqual(oursAfter.row("web", row)?["bout"], referenceAfter.row("web", row)?["bout"], "bout of \(row)")
        }
        XCTAssertEqual(oursAfter.row("web", "FRONTEND")?["stot"], "10")
        XCTAssertEqual(oursAfter.row("web", "a")?["stot"], "5", "round-robin")
        XCTAssertNotEqual(oursAfter.row("web", "a")?["lastsess"], "-1")
        XCTAssertEqual(ours.row("web", "a")?["lastsess"], "-1", "no session before the traffic")
    }
}
