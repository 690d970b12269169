import BerthEngine
import BerthSystem
import BerthHealth
import BerthStats
import Foundation
import Glibc
import XCTest

/// The pages as clients see them: a real browser, promtool, JSON, the status words.
final class PageTests: XCTestCase {
    /// Two services, live and dead backends, one drained and one in maintenance: headless
    /// chromium renders `/`, the PNG lands in test-output/, and the page's text names every
    /// backend with its status.
    func testBrowserRendersEveryBackendAndStatus() throws {
        guard let chromium = Tool.find(["chromium", "chromium-browser", "google-chrome"]) else {
            throw XCTSkip("chromium is not installed (scripts/test installs it)")
        }
        let checks = CheckSettings(kind: .tcp, interval: 100, timeout: 200, rise: 1, fall: 1)
        let stack = try StatsStack(services: [
            .init(name: "web", backends: ["web-a", "web-b", "web-c"], deadBackends: 1),
            .init(name: "api", backends: ["api-a", "api-b"]),
        ], checks: checks, credentials: "admin:secret")
        defer { stack.stop() }
        try stack.router.setAdminState(.drain, for: BackendKey(frontend: "web", backend: "web-b"))
        try stack.router.setAdminState(.maint, for: BackendKey(frontend: "api", backend: "api-b"))
        XCTAssertTrue(eventually(timeout: 5) {
            stack.router.health()[BackendKey(frontend: "web", backend: "web-dead0")]?.status == .down
        }, "the dead backend is found down")
        for _ in 0..<6 { _ = try HTTP.whoami(stack.frontends["web"]!) }
        for _ in 0..<3 { _ = try HTTP.whoami(stack.frontends["api"]!) }

        // Credentials in the URL: chromium sends them as basic auth.
        let url = "http://admin:secret@\(stack.statsAddress)/?refresh=30"
        let png = Tool.outputDirectory + "/stats-page.png"
        try? FileManager.default.removeItem(atPath: png)
        let profile = "\(NSTemporaryDirectory())berth-chromium-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: profile) }
        let common = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                      "--user-data-dir=\(profile)"]
        let shot = try Tool.run(chromium, common + ["--screenshot=\(png)", "--window-size=1400,900", url], timeout: 90)
        XCTAssertEqual(shot.status, 0, shot.error)
        let attributes = try FileManager.default.attributesOfItem(atPath: png)
        XCTAssertGreaterThan((attributes[.size] as? NSNumber)?.intValue ?? 0, 10_000, "a real screenshot was written")
        let dom = try Tool.run(chromium, common + ["--dump-dom", url], timeout: 90)
        XCTAssertEqual(dom.status, 0, dom.error)
        let page = dom.output
        print("screenshot: \(png); DOM \(page.utf8.count) bytes")
        XCTAssertTrue(page.contains("Berth statistics"))
        XCTAssertTrue(page.contains("<meta http-equiv=\"refresh\" content=\"30\">"))
        let expected: [(String, String)] = [
            ("web-a", "UP"), ("web-b", "DRAIN"), ("web-c", "UP"), ("web-dead0", "DOWN"), ("api-a", "UP"), ("api-b", "MAINT"),
        ]
        for (backend, status) in expected {
            // The row: its name cell, then its status cell.
            let pattern = "<td class=\"name\">\(backend) \\(127\\.0\\.0\\.1:[0-9]+\\)</td><td class=\"text\">\(status)</td>"
            XCTAssertNotNil(page.range(of: pattern, options: .regularExpression), "\(backend) shown \(status)")
        }
        XCTAssertTrue(page.contains("<h2>web "), "one table per service")
        XCTAssertTrue(page.contains("<h2>api "))
        XCTAssertTrue(page.contains("L4CON"), "the dead backend's check result")
    }

    /// `/metrics` passes `promtool check metrics`, with traffic, checks and all four statuses.
    func testMetricsPassPromtool() throws {
        guard let promtool = Tool.find(["promtool"]) else { throw XCTSkip("promtool is not installed (Debian: prometheus)") }
        let checks = CheckSettings(kind: .tcp, interval: 100, timeout: 200, rise: 1, fall: 1)
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"], deadBackends: 1)], checks: checks)
        defer { stack.stop() }
        try stack.router.setAdminState(.drain, for: BackendKey(frontend: "web", backend: "b"))
        XCTAssertTrue(eventually(timeout: 5) { stack.router.health()[BackendKey(frontend: "web", backend: "web-dead0")]?.status == .down })
        for _ in 0..<4 { _ = try HTTP.whoami(stack.frontends["web"]!) }
        let metrics = try HTTP.request(stack.statsAddress, "GET", "/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.headers["content-type"]?.hasPrefix("text/plain; version=0.0.4") == true)
        let file = NSTemporaryDirectory() + "berth-metrics-\(getpid()).txt"
        try metrics.body.write(toFile: file, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: file) }
        let check = try Tool.run("/bin/sh", ["-c", "\(promtool) check metrics < \(file)"], timeout: 30)
        XCTAssertEqual(check.status, 0, "promtool: \(check.output) \(check.error)")
        XCTAssertEqual(check.error.trimmingCharacters(in: .whitespacesAndNewlines), "", "no lint warnings")
        XCTAssertTrue(metrics.body.contains("berth_backend_up{service=\"web\",backend=\"a\"} 1"))
        XCTAssertTrue(metrics.body.contains("berth_backend_up{service=\"web\",backend=\"b\"} 0"), "drained: no new connections")
        XCTAssertTrue(metrics.body.contains("berth_backend_status{service=\"web\",backend=\"web-dead0\",state=\"DOWN\"} 1"))
        XCTAssertTrue(metrics.body.contains("berth_frontend_sessions_total{service=\"web\"} 4"))
        XCTAssertTrue(metrics.body.contains("berth_backend_sessions_total{service=\"web\",backend=\"a\"} 4"), "b drained, dead down: all on a")
    }

    /// `/stats.json` decodes into the model; `/healthz` answers without credentials; the other
    /// pages ask for them; HEAD, 404 and 405.
    func testJSONHealthzAndAuthentication() throws {
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a"])], credentials: "ops:pa:ss")
        defer { stack.stop() }
        _ = try HTTP.whoami(stack.frontends["web"]!)
        let good = StatsCredentials("ops:pa:ss")!.headerValue
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", "/healthz").status, 200)
        for path in ["/", "/;csv", "/stats;csv", "/stats.json", "/metrics"] {
            let refused = try HTTP.request(stack.statsAddress, "GET", path)
            XCTAssertEqual(refused.status, 401, path)
            XCTAssertTrue(refused.headers["www-authenticate"]?.hasPrefix("Basic") == true)
            XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", path, authorization: "Basic b3BzOndyb25n").status, 401, "wrong password: \(path)")
            XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", path, authorization: good).status, 200, path)
        }
        let json = try HTTP.request(stack.statsAddress, "GET", "/stats.json", authorization: good)
        let snapshot = try JSONDecoder().decode(StatsSnapshot.self, from: Data(json.body.utf8))
        XCTAssertEqual(snapshot.services.map(\.name), ["web"])
        XCTAssertEqual(snapshot.services[0].backends.map(\.name), ["a"])
        XCTAssertEqual(snapshot.services[0].backends[0].status, .noCheck)
        XCTAssertEqual(snapshot.services[0].backends[0].traffic.totalSessions, 1)
        XCTAssertNotNil(snapshot.services[0].backends[0].traffic.lastSessionSeconds)
        XCTAssertTrue(snapshot.process.adminEnabled)
        XCTAssertNil(snapshot.discovery)
        let head = try HTTP.request(stack.statsAddress, "HEAD", "/", authorization: good)
        XCTAssertEqual(head.status, 200)
        XCTAssertEqual(head.body, "", "HEAD: headers only")
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", "/nothing", authorization: good).status, 404)
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "DELETE", "/", authorization: good).status, 405)
    }

    /// Session rate and last-session age move as sessions start.
    func testSessionRateAndLastSession() throws {
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a"])])
        defer { stack.stop() }
        let start = monotonicSeconds()
        var rate = 0.0
        while monotonicSeconds() - start < 3, rate == 0 {
            for _ in 0..<20 { _ = try HTTP.whoami(stack.frontends["web"]!) }
            usleep(200_000)
            let json = try HTTP.request(stack.statsAddress, "GET", "/stats.json")
            let snapshot = try JSONDecoder().decode(StatsSnapshot.self, from: Data(json.body.utf8))
            rate = snapshot.services[0].frontend.sessionRate
            XCTAssertLessThan(snapshot.services[0].backends[0].traffic.lastSessionSeconds ?? 99, 1.5)
        }
        XCTAssertGreaterThan(rate, 0, "a session rate was measured within 3 s")
    }
}
