import BerthEngine
import BerthSystem
import BerthHealth
import BerthTestSupport
import Foundation
import XCTest

/// Active checks against real sockets on 127.0.0.1.
final class CheckerTests: XCTestCase {
    private var checker: HealthChecker!
    private var servers: [ScriptedServer] = []

    override func setUpWithError() throws {
        checker = try HealthChecker()
    }

    override func tearDown() {
        checker.stop()
        checker = nil
        for server in servers { server.stop() }
        servers = []
    }

    private func server(_ reply: @escaping @Sendable () -> ScriptedServer.Reply) throws -> ScriptedServer {
        let server = try ScriptedServer(reply: reply)
        servers.append(server)
        return server
    }

    private func settings(_ kind: CheckKind, timeout: Int64 = 300, interval: Int64 = 100) -> CheckSettings {
        CheckSettings(kind: kind, interval: interval, timeout: timeout, rise: 1, fall: 1)
    }

    /// Checks `address` until its first verdict arrives; returns the health.
    private func verdict(_ address: SocketAddress, _ settings: CheckSettings, name: String = "b") -> BackendHealth? {
        let key = BackendKey(frontend: "f", backend: name)
        checker.update([CheckTarget(key: key, address: address, settings: settings, initialState: .up)])
        _ = waitFor(timeout: 5) { checker.health()[key]?.lastResult != nil }
        return checker.health()[key]
    }

    private static func response(_ status: String) -> ScriptedServer.Reply {
        .send(Array("HTTP/1.1 \(status)\r\nContent-Length: 0\r\n\r\n".utf8), thenClose: true)
    }

    func testTCPCheck() throws {
        let open = try server { .hang }
        XCTAssertEqual(verdict(open.address, settings(.tcp))?.status, .up)
        let closed = try SocketAddress(parsing: "127.0.0.1:\(try freePort())")
        let down = verdict(closed, settings(.tcp), name: "closed")
        XCTAssertEqual(down?.status, .down)
        XCTAssertTrue(down?.lastResult?.detail.contains("refused") == true, "\(String(describing: down?.lastResult))")
    }

    /// A peer that drops the SYN (here a listener whose accept queue is full; on a network, a
    /// host that died or is cut off) has not passed a TCP check: the connect is still in progress
    /// at the timeout, which is L4TOUT. (SO_ERROR read before the socket is writable is 0.)
    func testTCPCheckOfAPeerThatNeverAnswersTheSYNTimesOut() throws {
        let silent = try SynDroppingListener()
        defer { silent.close() }
        let address = silent.address
        for kind in [CheckKind.tcp, .http(HTTPCheck(path: "/"))] {
            let health = verdict(address, settings(kind, timeout: 300, interval: 1_000), name: "syn-dropped-\(kind)")
            XCTAssertEqual(health?.status, .down, "\(kind): \(String(describing: health?.lastResult))")
            XCTAssertEqual(health?.lastResult?.detail, "timeout connecting after 300 ms")
            XCTAssertGreaterThanOrEqual(health?.lastResult?.duration ?? 0, 300)
        }
        // HAProxy's rule: the connect must complete within the smaller of timeout and interval.
        let quick = verdict(address, settings(.tcp, timeout: 1_000, interval: 200), name: "syn-dropped-inter")
        XCTAssertEqual(quick?.lastResult?.detail, "timeout connecting after 200 ms")
        XCTAssertLessThan(quick?.lastResult?.duration ?? 0, 1_000)
    }

    func testHTTPCheckJudgesTheStatus() throws {
        let ok = try server { Self.response("200 OK") }
        let failing = try server { Self.response("500 Internal Server Error") }
        let silent = try server { .hang }
        let http = CheckKind.http(HTTPCheck(path: "/health"))
        let up = verdict(ok.address, settings(http), name: "ok")
        XCTAssertEqual(up?.status, .up)
        XCTAssertEqual(up?.lastResult?.detail, "HTTP 200")
        let down = verdict(failing.address, settings(http), name: "500")
        XCTAssertEqual(down?.status, .down)
        XCTAssertEqual(down?.lastResult?.detail, "HTTP 500")
        let start = Date()
        let hung = verdict(silent.address, settings(http, timeout: 300), name: "silent")
        XCTAssertEqual(hung?.status, .down)
        XCTAssertEqual(hung?.lastResult?.detail, "timeout waiting for the HTTP status line after 300 ms")
        print("a backend that never answers: down after \(Int(Date().timeIntervalSince(start) * 1000)) ms (check timeout 300 ms)")
    }

    func testBadResponsesAreFailedChecksWithAClearError() throws {
        let garbage = try server { .send(Array("\u{0}\u{1}garbage\r\n\r\n".utf8), thenClose: true) }
        let truncated = try server { .send(Array("HTTP/1.1 20".utf8), thenClose: true) }
        let huge = try server { .send([UInt8](repeating: UInt8(ascii: "x"), count: 10 << 20), thenClose: true) }
        let empty = try server { .send([], thenClose: true) }
        let http = CheckKind.http(HTTPCheck())
        let cases: [(ScriptedServer, String, String)] = [
            (garbage, "garbage", "not an HTTP status line"),
            (truncated, "truncated", "truncated status line"),
            (huge, "huge", "no status line in the first"),
            (empty, "empty", "connection closed without a response"),
        ]
        for (server, name, expected) in cases {
            let health = verdict(server.address, settings(http, timeout: 2000), name: name)
            XCTAssertEqual(health?.status, .down, name)
            XCTAssertTrue(health?.lastResult?.detail.contains(expected) == true,
                          "\(name): \(String(describing: health?.lastResult?.detail))")
        }
    }
}
