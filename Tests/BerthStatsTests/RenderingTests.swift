@testable import BerthEngine
@testable import BerthSystem
import BerthHealth
@testable import BerthStats
import XCTest

/// The pure parts: routes, credentials, status words, check codes, escaping.
final class RenderingTests: XCTestCase {
    func testRoutes() {
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/"), .html(refresh: nil))
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/?refresh=5"), .html(refresh: 5))
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/?refresh=0"), .html(refresh: nil))
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/?refresh=99999"), .html(refresh: nil))
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/;csv"), .csv)
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/;csv;norefresh"), .csv)
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/stats;csv"), .csv)
        XCTAssertEqual(StatsRoute.resolve(method: "HEAD", target: "/stats.json"), .json)
        XCTAssertEqual(StatsRoute.resolve(method: "GET", target: "/metrics"), .metrics)
        XCTAssertEqual(StatsRoute.resolve(method: "POST", target: "/admin/backends/web/127.0.0.1:8001/drain"),
                       .admin(service: "web", backend: "127.0.0.1:8001", action: .drain))
        XCTAssertEqual(StatsRoute.resolve(method: "POST", target: "/admin/backends/web/a%2Fb/enable"),
                       .admin(service: "web", backend: "a/b", action: .ready))
        XCTAssertEqual(StatsRoute.resolve(method: "POST", target: "/admin/backends/web/a/maint"),
                       .admin(service: "web", backend: "a", action: .maint))
        if case .failure(let status, _) = StatsRoute.resolve(method: "POST", target: "/admin/backends/web/a/b/drain") {
            XCTAssertEqual(status, 404)
        } else { XCTFail("a path with an extra segment") }
        if case .failure(let status, _) = StatsRoute.resolve(method: "PUT", target: "/") { XCTAssertEqual(status, 405) } else { XCTFail() }
        XCTAssertFalse(StatsRoute.healthz.needsCredentials)
        XCTAssertTrue(StatsRoute.csv.needsCredentials)
    }

    func testCredentials() {
        XCTAssertNil(StatsCredentials("nocolon"))
        XCTAssertNil(StatsCredentials(":pass"))
        XCTAssertNil(StatsCredentials("user:"))
        let credentials = StatsCredentials("Aladdin:open sesame")!
        XCTAssertEqual(credentials.headerValue, "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")  // RFC 7617's example
        XCTAssertTrue(credentials.accepts("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))
        XCTAssertTrue(credentials.accepts("basic   QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))
        XCTAssertFalse(credentials.accepts("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ"))
        XCTAssertFalse(credentials.accepts("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==A"))
        XCTAssertFalse(credentials.accepts("Bearer QWxhZGRpbjpvcGVuIHNlc2FtZQ=="))
        XCTAssertFalse(credentials.accepts(nil))
        XCTAssertFalse(credentials.accepts(""))
    }

    func testStatusWords() {
        var health = BackendHealth(status: .up, kind: "tcp", now: 0)
        XCTAssertEqual(StatsCollector.status(admin: .ready, health: nil, enabled: true), .noCheck)
        XCTAssertEqual(StatsCollector.status(admin: .ready, health: health, enabled: true), .up)
        XCTAssertEqual(StatsCollector.status(admin: .drain, health: health, enabled: true), .drain)
        XCTAssertEqual(StatsCollector.status(admin: .drain, health: nil, enabled: true), .drain)
        XCTAssertEqual(StatsCollector.status(admin: .maint, health: health, enabled: true), .maint)
        health.status = .down
        XCTAssertEqual(StatsCollector.status(admin: .ready, health: health, enabled: true), .down)
        XCTAssertEqual(StatsCollector.status(admin: .drain, health: health, enabled: true), .down, "HAProxy: a drained server that fails its checks is DOWN")
        health.status = .unchecked
        XCTAssertEqual(StatsCollector.status(admin: .ready, health: health, enabled: true), .up)
    }

    func testCheckCodes() {
        func code(_ kind: String, _ succeeded: Bool, _ detail: String) -> String {
            CheckReport.code(kind: kind, result: CheckResult(succeeded: succeeded, duration: 1, detail: detail)).code
        }
        XCTAssertEqual(CheckReport.code(kind: "tcp", result: nil).code, "INI")
        XCTAssertEqual(code("tcp", true, "TCP connect ok"), "L4OK")
        XCTAssertEqual(code("tcp", false, "connect: Connection refused"), "L4CON")
        XCTAssertEqual(code("tcp", false, "timeout connecting after 1000 ms"), "L4TOUT")
        XCTAssertEqual(code("http:/", false, "timeout connecting after 1000 ms"), "L4TOUT")
        XCTAssertEqual(code("https:/", false, "timeout in the TLS handshake after 1000 ms"), "L6TOUT")
        XCTAssertEqual(code("http:/", false, "timeout waiting for the HTTP status line after 1000 ms"), "L7TOUT")
        XCTAssertEqual(code("http:/", true, "HTTP 200"), "L7OK")
        XCTAssertEqual(code("http:/", false, "HTTP 503"), "L7STS")
        XCTAssertEqual(CheckReport.code(kind: "http:/", result: CheckResult(succeeded: false, duration: 1, detail: "HTTP 503")).httpStatus, 503)
        XCTAssertEqual(code("http:/", false, "not an HTTP status line: \"x\""), "L7RSP")
        XCTAssertEqual(code("tls", true, "TLS handshake ok"), "L6OK")
        XCTAssertEqual(code("tls", false, "TLS handshake: connection closed"), "L6RSP")
    }

    func testEscaping() {
        XCTAssertEqual(CSVRenderer.escape("plain"), "plain")
        XCTAssertEqual(CSVRenderer.escape("a,b"), "\"a,b\"")
        XCTAssertEqual(CSVRenderer.escape("say \"hi\""), "\"say \"\"hi\"\"\"")
        XCTAssertEqual(MetricsRenderer.escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd")
        XCTAssertEqual(MetricsRenderer.number(3), "3")
        XCTAssertEqual(MetricsRenderer.number(0.25), "0.25")
        XCTAssertEqual(HTMLRenderer.escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;")
        XCTAssertEqual(HTMLRenderer.grouped(1_234_567), "1,234,567")
        XCTAssertEqual(HTMLRenderer.grouped(12), "12")
        XCTAssertEqual(HTMLRenderer.duration(3725), "1h2m")
        XCTAssertEqual(HTMLRenderer.duration(65), "1m5s")
    }

    func testRateSampler() {
        var sampler = RateSampler()
        var statistics = EngineStatisticsFixture.make(total: 100)
        sampler.record(statistics, now: 1_000)
        statistics = EngineStatisticsFixture.make(total: 150)
        sampler.record(statistics, now: 2_000)
        XCTAssertEqual(sampler.rate(BackendKey(frontend: "web", backend: "")).current, 50)
        XCTAssertEqual(sampler.rate(BackendKey(frontend: "web", backend: "a")).current, 50)
        statistics = EngineStatisticsFixture.make(total: 160)
        sampler.record(statistics, now: 4_000)
        XCTAssertEqual(sampler.rate(BackendKey(frontend: "web", backend: "a")).current, 5)
        XCTAssertEqual(sampler.rate(BackendKey(frontend: "web", backend: "a")).max, 50)
    }
}

enum EngineStatisticsFixture {
    /// One frontend `web` with one backend `a`, both at `total` sessions.
    static func make(total: UInt64) -> EngineStatistics {
        var traffic = TrafficSnapshot()
        traffic.totalSessions = total
        var frontend = FrontendStatistics()
        frontend.traffic = traffic
        frontend.backends["a"] = traffic
        var statistics = EngineStatistics()
        statistics.frontends["web"] = frontend
        return statistics
    }
}
