import Foundation
import Glibc
import XCTest

/// Acceptance item 2: `berth whoami`, the demo backend, speaks enough HTTP/1.1 for the tests:
/// keep-alive, pipelining, HTTP/1.0 close, and it rejects what is not a request.
final class WhoamiTests: BerthTestCase {
    private func startServer() throws -> ListeningChild {
        try startWhoami(id: "alpha", threads: 2)
    }

    func testKeepAliveAnswersTwoRequestsOnOneConnection() throws {
        let server = try startServer()
        let fd = try connect(server.port)
        for round in 1...2 {
            XCTAssertTrue(TestSocket.sendAll(fd, HTTPExchange.request()))
            let (responses, ending) = HTTPExchange.readResponses(fd, count: 1, timeout: 5)
            XCTAssertEqual(responses.count, 1, "request \(round) on the kept-alive connection (\(ending))")
            XCTAssertEqual(responses.first?.status, 200)
            XCTAssertEqual(responses.first?.text, "I'm alpha\n")
            XCTAssertNil(responses.first?.headers["connection"], "a keep-alive answer does not close")
        }
        XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 0.3), .timedOut, "the connection stays open")
    }

    func testPipelinedRequestsAreAnsweredInOrder() throws {
        let server = try startServer()
        let fd = try connect(server.port)
        let pipeline = HTTPExchange.request() + HTTPExchange.request("/bytes/5")
            + "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 7\r\n\r\npayload"
            + HTTPExchange.request("/bytes/0") + HTTPExchange.request()
        XCTAssertTrue(TestSocket.sendAll(fd, pipeline), "one write carries five requests")
        let (responses, ending) = HTTPExchange.readResponses(fd, count: 5, timeout: 5)
        print("pipelined: \(responses.map { "\($0.status) \($0.text.debugDescription)" }) (\(ending))")
        XCTAssertEqual(responses.map(\.status), [200, 200, 200, 200, 200])
        XCTAssertEqual(responses.map(\.text), ["I'm alpha\n", "xxxxx", "I'm alpha\n", "", "I'm alpha\n"])
        XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 0.3), .timedOut, "still open after the pipeline")
    }

    func testHTTP10RequestIsAnsweredThenClosed() throws {
        let server = try startServer()
        let fd = try connect(server.port)
        XCTAssertTrue(TestSocket.sendAll(fd, HTTPExchange.request(version: "HTTP/1.0")))
        let (responses, _) = HTTPExchange.readResponses(fd, count: 1, timeout: 5)
        XCTAssertEqual(responses.first?.status, 200)
        XCTAssertEqual(responses.first?.text, "I'm alpha\n")
        XCTAssertEqual(responses.first?.headers["connection"]?.lowercased(), "close")
        XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 3), .closed, "HTTP/1.0 without keep-alive closes")

        let explicit = try connect(server.port)
        XCTAssertTrue(TestSocket.sendAll(explicit, HTTPExchange.request(headers: "Connection: close\r\n")))
        XCTAssertEqual(HTTPExchange.readResponses(explicit, count: 1, timeout: 5).responses.first?.status, 200)
        XCTAssertEqual(TestSocket.waitForClose(explicit, timeout: 3), .closed, "Connection: close closes")
    }

    func testGarbageGets400AndClose() throws {
        let server = try startServer()
        for garbage in ["hello world\r\n\r\n", "GET /\r\n\r\n", "GET / HTTP/2.0\r\n\r\n", "\u{16}\u{03}\u{01}\u{02}\u{00}"] {
            let fd = try connect(server.port)
            XCTAssertTrue(TestSocket.sendAll(fd, garbage))
            let (responses, ending) = HTTPExchange.readResponses(fd, count: 1, timeout: 5)
            print("garbage \(garbage.debugDescription) → \(responses.first.map { "\($0.status) \($0.text.debugDescription)" } ?? "nothing") (\(ending))")
            XCTAssertEqual(responses.first?.status, 400, "garbage \(garbage.debugDescription)")
            XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 3), .closed, "closed after 400 for \(garbage.debugDescription)")
        }
        XCTAssertEqual(HTTPExchange.get(server.port)?.text, "I'm alpha\n", "the server still answers")
    }

    func testOversizedHeaderGets431AndClose() throws {
        let server = try startServer()
        for split in [false, true] {
            let fd = try connect(server.port)
            let head = "GET / HTTP/1.1\r\nHost: test\r\nX-Padding: \(String(repeating: "a", count: 20 * 1024))\r\n\r\n"
            if split {
                // The same head in 1 KiB writes: the limit must hold however the bytes arrive.
                for chunk in stride(from: 0, to: head.utf8.count, by: 1024) {
                    let bytes = Array(head.utf8)
                    guard TestSocket.sendAll(fd, Array(bytes[chunk..<min(chunk + 1024, bytes.count)])) else { break }
                    usleep(2000)
                }
            } else {
                TestSocket.sendAll(fd, head)
            }
            let (responses, ending) = HTTPExchange.readResponses(fd, count: 1, timeout: 5)
            print("20 KiB header (\(split ? "1 KiB writes" : "one write")) → \(responses.first.map { "\($0.status) \($0.text.debugDescription)" } ?? "nothing") (\(ending))")
            XCTAssertEqual(responses.first?.status, 431, "a 20 KiB request head is 431 Request Header Fields Too Large")
            let closing = TestSocket.waitForClose(fd, timeout: 3)
            XCTAssertTrue(closing == .closed || closing == .reset, "closed after the rejection, got \(closing)")
        }
    }

    /// The same conversations through `berth proxy`: it must not disturb pipelining or closes.
    func testKeepAliveAndPipeliningThroughProxy() throws {
        let server = try startServer()
        for relay in ["splice", "copy"] {
            let proxy = try startProxy(backends: [server.address], options: ["--workers", "1", "--relay", relay])
            let fd = try connect(proxy.port)
            XCTAssertTrue(TestSocket.sendAll(fd, HTTPExchange.request() + HTTPExchange.request("/bytes/100000") + HTTPExchange.request()))
            let (responses, ending) = HTTPExchange.readResponses(fd, count: 3, timeout: 5)
            XCTAssertEqual(responses.map(\.status), [200, 200, 200], "\(relay): \(ending)")
            XCTAssertEqual(responses.map(\.body.count), [10, 100_000, 10], relay)
            XCTAssertTrue(TestSocket.sendAll(fd, HTTPExchange.request(version: "HTTP/1.0")))
            XCTAssertEqual(HTTPExchange.readResponses(fd, count: 1, timeout: 5).responses.first?.text, "I'm alpha\n", relay)
            XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 3), .closed, "\(relay): the backend's close reaches the client")
            // Half-closed now (the backend's FIN was passed on); the client's close ends the session.
            sockets.close(fd)
            proxy.process.signal(SIGTERM)
            XCTAssertEqual(proxy.process.waitForExit(timeout: 5), .exited(0), relay)
        }
    }
}
