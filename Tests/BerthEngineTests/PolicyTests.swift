@testable import BerthEngine
@testable import BerthSystem
import BerthRegistry
import BerthWhoami
import XCTest

/// Pure logic: no sockets.
final class PolicyTests: XCTestCase {
    func testDurationsAreReadAsHAProxyWritesThem() throws {
        XCTAssertEqual(try DurationText.milliseconds("200ms"), 200)
        XCTAssertEqual(try DurationText.milliseconds("2s"), 2000)
        XCTAssertEqual(try DurationText.milliseconds("1m"), 60_000)
        XCTAssertEqual(try DurationText.milliseconds("1h"), 3_600_000)
        XCTAssertEqual(try DurationText.milliseconds("1d"), 86_400_000)
        XCTAssertEqual(try DurationText.milliseconds("150"), 150)
        XCTAssertEqual(try DurationText.milliseconds("1500us"), 2)
        XCTAssertEqual(try DurationText.milliseconds("0"), 0)
        for bad in ["", "s", "5x", "-1s", "1.5s", "2 s", "99999999999999999999d", "1m2s"] {
            XCTAssertThrowsError(try DurationText.milliseconds(bad), bad)
        }
        XCTAssertEqual(DurationText.format(milliseconds: 60_000), "1m")
        XCTAssertEqual(DurationText.format(milliseconds: 1500), "1500ms")
        XCTAssertEqual(DurationText.format(milliseconds: 2000), "2s")
    }

    func testAddressesParseIPv4IPv6AndWildcards() throws {
        XCTAssertEqual(try SocketAddress(parsing: "127.0.0.1:8000").description, "127.0.0.1:8000")
        XCTAssertEqual(try SocketAddress(parsing: "[::1]:8080").description, "[::1]:8080")
        XCTAssertEqual(try SocketAddress(parsing: "[::1]:8080").family, AF_INET6)
        XCTAssertEqual(try SocketAddress(parsing: "*:80").description, "0.0.0.0:80")
        XCTAssertEqual(try SocketAddress(parsing: ":80").description, "0.0.0.0:80")
        XCTAssertEqual(try SocketAddress(parsing: "localhost:1").description, "127.0.0.1:1")
        XCTAssertEqual(try SocketAddress(parsing: "127.0.0.1:65535").port, 65535)
        for bad in ["127.0.0.1", "1.2.3:80", "127.0.0.1:65536", "127.0.0.1:-1", "::1:80", "[::1:80", "[::1]80",
                    "example.com:80", "127.0.0.1:", "300.1.1.1:80"] {
            XCTAssertThrowsError(try SocketAddress(parsing: bad), bad)
        }
        XCTAssertEqual(try SocketAddress(parsing: "127.0.0.1:1"), try SocketAddress(parsing: "127.0.0.1:1"))
        XCTAssertNotEqual(try SocketAddress(parsing: "127.0.0.1:1"), try SocketAddress(parsing: "127.0.0.1:2"))
    }

    /// `Frontend` shares its fields between copies until one is changed (copy on write).
    func testAChangedCopyOfAFrontendLeavesTheOriginalAsItWas() {
        let address = SocketAddress(ipv4: (127, 0, 0, 1), port: 8080)
        let original = Frontend(name: "web", listen: address, backends: [Backend(name: "a", address: address)])
        var copy = original
        XCTAssertEqual(copy, original)
        copy.backends[0].enabled = false
        copy.settings.retries = 1
        copy.name = "web2"
        copy.listen = SocketAddress(ipv4: (127, 0, 0, 1), port: 8081)
        XCTAssertTrue(original.backends[0].enabled)
        XCTAssertEqual(original.settings.retries, 3)
        XCTAssertEqual(original.name, "web")
        XCTAssertEqual(original.listen.port, 8080)
        XCTAssertNotEqual(copy, original)
        // Equal fields in separate storage are equal; one field apart, not.
        let rebuilt = Frontend(name: "web", listen: address, backends: [Backend(name: "a", address: address)])
        XCTAssertEqual(rebuilt, original)
        var other = rebuilt
        other.settings.retries = 0
        XCTAssertNotEqual(other, original)
    }

    func testRoundRobinWalksOnToTheNextBackendOnRetry() {
        XCTAssertEqual((0..<6).map { RoundRobin.index(position: UInt64($0), attempt: 0, count: 3) }, [0, 1, 2, 0, 1, 2])
        XCTAssertEqual((0..<4).map { RoundRobin.index(position: 2, attempt: $0, count: 3) }, [2, 0, 1, 2])
        let cursor = RoundRobinCursor()
        XCTAssertEqual((0..<3).map { _ in cursor.next() }, [0, 1, 2])
    }

    func testDeadlineHeapPopsInOrder() {
        var heap = DeadlineHeap()
        for deadline in [50, 10, 40, 30, 20, 10] as [Int64] {
            heap.insert(.init(deadline: deadline, slot: Int32(deadline), generation: 0))
        }
        XCTAssertEqual(heap.earliest, 10)
        XCTAssertNil(heap.popDue(now: 9))
        var popped: [Int64] = []
        while let entry = heap.popDue(now: 35) { popped.append(entry.deadline) }
        XCTAssertEqual(popped, [10, 10, 20, 30])
        XCTAssertEqual(heap.count, 2)
    }

    func testRoutingTableValidation() throws {
        let address = try SocketAddress(parsing: "127.0.0.1:1000")
        let backend = Backend(try SocketAddress(parsing: "127.0.0.1:2000"))
        XCTAssertNil(RoutingTable(frontends: [Frontend(name: "a", listen: address, backends: [backend])]).validationError())
        XCTAssertNotNil(RoutingTable(frontends: [
            Frontend(name: "a", listen: address, backends: []),
            Frontend(name: "a", listen: address.withPort(1001), backends: []),
        ]).validationError())
        XCTAssertNotNil(RoutingTable(frontends: [
            Frontend(name: "a", listen: address, backends: []),
            Frontend(name: "b", listen: address, backends: []),
        ]).validationError())
        XCTAssertNotNil(RoutingTable(frontends: [
            Frontend(name: "a", listen: address, backends: [backend, backend]),
        ]).validationError())
    }

    func testRequestHeads() {
        func parse(_ text: String) -> RequestHead.ParseResult {
            Array(text.utf8).withUnsafeBytes { RequestHead.parse($0) }
        }
        guard case .complete(let head, let length) = parse("GET /x HTTP/1.1\r\nHost: a\r\n\r\nrest") else {
            return XCTFail("expected a complete head")
        }
        XCTAssertEqual(head.method, "GET")
        XCTAssertEqual(head.target, "/x")
        XCTAssertTrue(head.keepAlive)
        XCTAssertEqual(length, 28)
        guard case .complete(let old, _) = parse("GET / HTTP/1.0\r\n\r\n") else { return XCTFail() }
        XCTAssertFalse(old.keepAlive)
        guard case .complete(let closing, _) = parse("POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 5\r\n\r\n") else {
            return XCTFail()
        }
        XCTAssertFalse(closing.keepAlive)
        XCTAssertEqual(closing.contentLength, 5)
        XCTAssertEqual(parse("GET / HTTP/1.1\r\nHost: a\r\n"), .incomplete)
        if case .invalid = parse("\u{16}\u{03}\u{01}garbage") {} else { XCTFail("TLS bytes are not HTTP") }
        if case .invalid = parse("GET / SPDY/3\r\n\r\n") {} else { XCTFail("bad version") }
        if case .invalid = parse("GET / HTTP/1.1\r\nContent-Length: -3\r\n\r\n") {} else { XCTFail("bad length") }
        XCTAssertEqual(parse("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 9000)), .tooLarge)
        XCTAssertEqual(parse("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 9000) + "\r\n\r\n"), .tooLarge)
    }

    func testDurationsAreBoundedAndDeadlinesSaturate() throws {
        XCTAssertEqual(try DurationText.milliseconds("24d"), 2_073_600_000)
        XCTAssertEqual(try DurationText.milliseconds("2147483647"), DurationText.maximum)
        for text in ["25d", "2147483648", "9999999999999h", "99999999999999999999"] {
            XCTAssertThrowsError(try DurationText.milliseconds(text), text) { error in
                XCTAssertTrue("\(error)".contains("at most 24d"), "\(text): \(error)")
            }
        }
        XCTAssertEqual(Deadline.after(500, from: 1_000), 1_500)
        XCTAssertEqual(Deadline.after(.max - 10, from: 1_000), .max)
        XCTAssertEqual(Deadline.idle(0, since: 1_000), .max, "0: no timeout")
        XCTAssertEqual(Deadline.idle(60_000, since: .max - 5), .max)
    }

    func testCPUQuotaFromCgroupFiles() {
        XCTAssertNil(CPUQuota.parseV2("max 100000\n"))
        XCTAssertEqual(CPUQuota.parseV2("200000 100000\n"), 2)
        XCTAssertEqual(CPUQuota.parseV2("150000 100000"), 2, "1.5 CPUs round up")
        XCTAssertEqual(CPUQuota.parseV2("5000 100000"), 1)
        XCTAssertNil(CPUQuota.parseV2("garbage"))
        XCTAssertNil(CPUQuota.parseV1(quota: "-1\n", period: "100000\n"))
        XCTAssertEqual(CPUQuota.parseV1(quota: "400000\n", period: "100000\n"), 4)
        XCTAssertGreaterThanOrEqual(availableCPUCount(), 1)
    }
}
