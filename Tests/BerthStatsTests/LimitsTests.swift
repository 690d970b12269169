import BerthSystem
import BerthStats
import Foundation
import Glibc
import XCTest

/// Each bound of the stats server, one at a time: header and body sizes, garbage, idle and
/// slowloris connections, keep-alive, the connection cap.
final class LimitsTests: XCTestCase {
    private func stack(_ configure: @escaping (inout StatsServerConfiguration) -> Void) throws -> StatsStack {
        try StatsStack(services: [.init(name: "web", backends: ["a"])], configure: configure)
    }

    /// Sends `bytes`, then reads to EOF: the response, if any.
    private func exchange(_ address: SocketAddress, _ bytes: [UInt8]) throws -> HTTP.Response? {
        let fd = try HTTP.connect(address)
        defer { close(fd) }
        HTTP.send(fd, bytes)
        return HTTP.parse(HTTP.receiveAll(fd))
    }

    func testOversizedAndGarbageRequestsAreRefusedAndClosed() throws {
        let stack = try stack { _ in }
        defer { stack.stop() }
        let bigHeader = "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "a", count: 9 * 1024) + "\r\n\r\n"
        XCTAssertEqual(try exchange(stack.statsAddress, Array(bigHeader.utf8))?.status, 431)
        let bigURL = "GET /" + String(repeating: "a", count: 9 * 1024) + " HTTP/1.1\r\nHost: x\r\n\r\n"
        XCTAssertEqual(try exchange(stack.statsAddress, Array(bigURL.utf8))?.status, 431)
        let body = "POST /admin/backends/web/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + String(repeating: "b", count: 5000)
        XCTAssertEqual(try exchange(stack.statsAddress, Array(body.utf8))?.status, 413)
        XCTAssertEqual(try exchange(stack.statsAddress, [0, 1, 2, 0xFF] + Array("junk\r\n\r\n".utf8))?.status, 400)
        XCTAssertEqual(try exchange(stack.statsAddress, Array("GET / HTTP/9.9\r\n\r\n".utf8))?.status, 400)
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", "/healthz").status, 200, "still serving")
    }

    func testIdleAndSlowClientsAreClosedAndKeepAliveWorks() throws {
        let stack = try stack { $0.requestTimeout = 300 }
        defer { stack.stop() }
        // Two requests on one connection, then silence: closed after the request timeout.
        let fd = try HTTP.connect(stack.statsAddress)
        defer { close(fd) }
        HTTP.send(fd, Array("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        let begin = monotonicSeconds()
        let received = String(decoding: HTTP.receiveAll(fd), as: UTF8.self)
        let took = monotonicSeconds() - begin
        XCTAssertEqual(received.components(separatedBy: "HTTP/1.1 200").count - 1, 2, "both answered on one connection")
        XCTAssertGreaterThan(took, 0.2, "kept alive at first")
        XCTAssertLessThan(took, 4, "then closed for idling (the socket's own timeout is 5 s)")

        // A slowloris client: a byte every 100 ms never completes a request within 300 ms.
        let slow = try HTTP.connect(stack.statsAddress)
        defer { close(slow) }
        let start = monotonicSeconds()
        var closed = false
        for byte in Array("GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".utf8) {
            var poller = pollfd(fd: slow, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 0) > 0 || !HTTP.send(slow, [byte]) {
                closed = true
                break
            }
            usleep(100_000)
        }
        XCTAssertTrue(closed, "the server closed the slow client")
        XCTAssertLessThan(monotonicSeconds() - start, 3)
    }

    func testConnectionCap() throws {
        let stack = try stack { $0.maxConnections = 3 }
        defer { stack.stop() }
        let held = try (0..<3).map { _ in try HTTP.connect(stack.statsAddress) }
        XCTAssertTrue(eventually(timeout: 2) { stack.server.connectionCounts.open == 3 })
        let extra = try HTTP.connect(stack.statsAddress)
        XCTAssertEqual(HTTP.receiveAll(extra), [], "past the cap: closed at once, nothing read")
        close(extra)
        XCTAssertEqual(stack.server.connectionCounts.refused, 1)
        for fd in held { close(fd) }
        XCTAssertTrue(eventually(timeout: 2) { stack.server.connectionCounts.open == 0 })
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", "/healthz").status, 200, "served again below the cap")
    }
}
