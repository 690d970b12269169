import BerthSystem
@testable import BerthHealth
import XCTest

/// Pure logic of health: no sockets.
final class HealthPolicyTests: XCTestCase {
    private func result(_ ok: Bool) -> CheckResult { CheckResult(succeeded: ok, duration: 1, detail: ok ? "ok" : "no") }

    func testRiseAndFallAsHAProxyCountsThem() {
        var health = BackendHealth(status: .up, kind: "tcp", now: 0)
        XCTAssertFalse(health.record(result(false), rise: 3, fall: 2, now: 1))
        XCTAssertEqual(health.status, .up)
        XCTAssertTrue(health.record(result(false), rise: 3, fall: 2, now: 2))
        XCTAssertEqual(health.status, .down)
        XCTAssertEqual(health.lastChange, 2)
        XCTAssertFalse(health.record(result(true), rise: 3, fall: 2, now: 3))
        XCTAssertFalse(health.record(result(true), rise: 3, fall: 2, now: 4))
        XCTAssertEqual(health.status, .down)
        XCTAssertTrue(health.record(result(true), rise: 3, fall: 2, now: 5))
        XCTAssertEqual(health.status, .up)
        XCTAssertEqual(health.checksDone, 5)
        // A success in between resets the failure count.
        _ = health.record(result(false), rise: 3, fall: 2, now: 6)
        _ = health.record(result(true), rise: 3, fall: 2, now: 7)
        _ = health.record(result(false), rise: 3, fall: 2, now: 8)
        XCTAssertEqual(health.status, .up)
    }

    func testUncheckedBackendsTakeTrafficUntilTheirFirstVerdict() {
        var health = BackendHealth(status: .unchecked, kind: "tcp", now: 0)
        XCTAssertTrue(health.takesTraffic)
        XCTAssertTrue(health.record(result(true), rise: 3, fall: 2, now: 1))
        XCTAssertEqual(health.status, .up)
        var failing = BackendHealth(status: .unchecked, kind: "tcp", now: 0)
        XCTAssertFalse(failing.record(result(false), rise: 3, fall: 2, now: 1))
        XCTAssertTrue(failing.record(result(false), rise: 3, fall: 2, now: 2))
        XCTAssertEqual(failing.status, .down)
    }

    func testPassiveEjectionIsImmediateAndOnlyChecksBringItBack() {
        var health = BackendHealth(status: .up, kind: "tcp", now: 0)
        XCTAssertTrue(health.eject(now: 5))
        XCTAssertEqual(health.status, .down)
        XCTAssertEqual(health.ejections, 1)
        XCTAssertFalse(health.eject(now: 6))
        XCTAssertFalse(health.record(result(true), rise: 2, fall: 2, now: 7))
        XCTAssertTrue(health.record(result(true), rise: 2, fall: 2, now: 8))
    }

    func testCheckKindsParse() {
        XCTAssertEqual(CheckKind.parse("tcp"), .tcp)
        XCTAssertEqual(CheckKind.parse("http"), .http(HTTPCheck(path: "/")))
        XCTAssertEqual(CheckKind.parse("http:/health"), .http(HTTPCheck(path: "/health")))
        XCTAssertEqual(CheckKind.parse("tls"), .tls(TLSCheck()))
        XCTAssertEqual(CheckKind.parse("https:/x"), .https(HTTPCheck(path: "/x"), TLSCheck()))
        for bad in ["", "udp", "http:health", "tcp:/x", "http:/a b", "HTTP"] {
            XCTAssertNil(CheckKind.parse(bad), bad)
        }
        XCTAssertEqual(HTTPCheck.parseStatusRange("200-399"), 200...399)
        XCTAssertEqual(HTTPCheck.parseStatusRange("204"), 204...204)
        for bad in ["", "2xx", "399-200", "99", "200-", "200-700"] { XCTAssertNil(HTTPCheck.parseStatusRange(bad), bad) }
    }

    func testHTTPCheckRequest() throws {
        let request = String(decoding: HTTPCheck(path: "/ping").request(for: try SocketAddress(parsing: "127.0.0.1:81")), as: UTF8.self)
        XCTAssertTrue(request.hasPrefix("GET /ping HTTP/1.1\r\nHost: 127.0.0.1:81\r\n"))
        XCTAssertTrue(request.hasSuffix("\r\n\r\n"))
    }
}
