import BerthSystem
import Glibc
import XCTest

/// The PROXY protocol reader (BerthSystem's `ProxyHeaderParser`) and `berth whoami
/// --accept-proxy`, which the bench and the demo put behind `--send-proxy`.
final class ProxyHeaderTests: BerthTestCase {
    private func address(_ text: String) throws -> SocketAddress { try SocketAddress(parsing: text) }

    func testV1HeadersOfBothFamiliesAreRead() throws {
        let line = "PROXY TCP4 192.0.2.7 198.51.100.1 40000 80\r\nGET / HTTP/1.1\r\n"
        XCTAssertEqual(ProxyHeaderParser.parse(Array(line.utf8)),
                       .complete(source: try address("192.0.2.7:40000"), destination: try address("198.51.100.1:80"), length: 44))
        let six = "PROXY TCP6 2001:db8::7 ::1 65535 8080\r\n"
        XCTAssertEqual(ProxyHeaderParser.parse(Array(six.utf8)),
                       .complete(source: try address("[2001:db8::7]:65535"), destination: try address("[::1]:8080"), length: six.utf8.count))
        XCTAssertEqual(ProxyHeaderParser.parse(Array("PROXY UNKNOWN\r\n".utf8)), .complete(source: nil, destination: nil, length: 15))
    }

    func testV1EveryPrefixIsIncompleteAndBadLinesAreInvalid() {
        let line = Array("PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n".utf8)
        for count in 0..<line.count {
            XCTAssertEqual(ProxyHeaderParser.parse(Array(line[0..<count])), .incomplete, "a prefix of \\(count) bytes")
        }
        for bad in ["PROXY TCP4 10.0.0.1 10.0.0.2 1 2\n", "PROXY TCP5 10.0.0.1 10.0.0.2 1 2\r\n",
                    "PROXY TCP4 ::1 10.0.0.2 1 2\r\n", "PROXY TCP6 10.0.0.1 ::1 1 2\r\n", "PROXY TCP4 10.0.0.1 10.0.0.2 01 2\r\n",
                    "PROXY TCP4 10.0.0.1 10.0.0.2 1 65536\r\n", "PROXY TCP4 10.0.0.1 10.0.0.2 1\r\n", "GET / HTTP/1.1\r\n",
                    "PROXY TCP4 " + String(repeating: "9", count: 120) + "\r\n"] {
            guard case .invalid = ProxyHeaderParser.parse(Array(bad.utf8)) else {
                return XCTFail("accepted \\(bad.debugDescription)")
            }
        }
    }

    func testV2HeadersAreRead() throws {
        var four = ProxyHeaderParser.v2Signature + [0x21, 0x11, 0x00, 12]
        four += [192, 0, 2, 7, 198, 51, 100, 1, 0x9C, 0x40, 0x00, 0x50]
        XCTAssertEqual(ProxyHeaderParser.parse(four + Array("GET".utf8)),
                       .complete(source: try address("192.0.2.7:40000"), destination: try address("198.51.100.1:80"), length: 28))
        var six = ProxyHeaderParser.v2Signature + [0x21, 0x21, 0x00, 36 + 3]
        six += [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [7]
        six += [UInt8](repeating: 0, count: 15) + [1]
        six += [0xFF, 0xFF, 0x1F, 0x90] + [0x04, 0x00, 0x00]  // ports, then a TLV (NOOP, empty) that is skipped
        XCTAssertEqual(ProxyHeaderParser.parse(six),
                       .complete(source: try address("[2001:db8::7]:65535"), destination: try address("[::1]:8080"), length: 16 + 39))
        let local = ProxyHeaderParser.v2Signature + [0x20, 0x00, 0x00, 0x00]
        XCTAssertEqual(ProxyHeaderParser.parse(local), .complete(source: nil, destination: nil, length: 16))
        for count in 0..<four.count {
            XCTAssertEqual(ProxyHeaderParser.parse(Array(four[0..<count])), .incomplete, "a prefix of \\(count) bytes")
        }
        var badVersion = four
        badVersion[12] = 0x11
        let shortBlock = ProxyHeaderParser.v2Signature + [0x21, 0x11, 0x00, 4, 1, 2, 3, 4]
        var badSignature = four
        badSignature[5] = 0x0A
        for bad in [badVersion, shortBlock, badSignature] {
            guard case .invalid = ProxyHeaderParser.parse(bad) else { return XCTFail("accepted \\(bad)") }
        }
    }

    func testEncoderWritesExactHeadersThatReadBack() throws {
        let four = (try address("192.0.2.7:40000"), try address("198.51.100.1:80"))
        let six = (try address("[2001:db8::7]:65535"), try address("[::1]:8080"))
        XCTAssertEqual(String(decoding: ProxyHeaderEncoder.encode(v2: false, source: four.0, destination: four.1), as: UTF8.self),
                       "PROXY TCP4 192.0.2.7 198.51.100.1 40000 80\r\n")
        XCTAssertEqual(String(decoding: ProxyHeaderEncoder.encode(v2: false, source: six.0, destination: six.1), as: UTF8.self),
                       "PROXY TCP6 2001:db8::7 ::1 65535 8080\r\n")
        XCTAssertEqual(ProxyHeaderEncoder.encode(v2: true, source: four.0, destination: four.1),
                       ProxyHeaderParser.v2Signature + [0x21, 0x11, 0x00, 12, 192, 0, 2, 7, 198, 51, 100, 1, 0x9C, 0x40, 0x00, 0x50])
        let sixBytes = ProxyHeaderEncoder.encode(v2: true, source: six.0, destination: six.1)
        XCTAssertEqual(Array(sixBytes.prefix(16)), ProxyHeaderParser.v2Signature + [0x21, 0x21, 0x00, 36])
        XCTAssertEqual(sixBytes.count, 52)
        for v2 in [false, true] {
            for (source, destination) in [four, six] {
                let header = ProxyHeaderEncoder.encode(v2: v2, source: source, destination: destination)
                XCTAssertLessThanOrEqual(header.count, ProxyHeaderEncoder.maximumLength)
                XCTAssertEqual(ProxyHeaderParser.parse(header), .complete(source: source, destination: destination, length: header.count))
            }
            // Unknown or mixed families: UNKNOWN (v1), LOCAL (v2).
            let unknown = ProxyHeaderEncoder.encode(v2: v2, source: nil, destination: four.1)
            XCTAssertEqual(ProxyHeaderParser.parse(unknown), .complete(source: nil, destination: nil, length: unknown.count))
            let mixed = ProxyHeaderEncoder.encode(v2: v2, source: four.0, destination: six.1)
            XCTAssertEqual(ProxyHeaderParser.parse(mixed), .complete(source: nil, destination: nil, length: mixed.count))
        }
    }

    /// whoami --accept-proxy answers with the client the header names, both versions, and
    /// refuses a connection that starts without one.
    func testWhoamiAcceptProxyNamesTheClient() throws {
        let server = try startWhoami(id: "pp", options: ["--accept-proxy"])
        let v1 = try connect(server.port)
        XCTAssertTrue(TestSocket.sendAll(v1, "PROXY TCP4 192.0.2.7 127.0.0.1 40000 80\r\n" + HTTPExchange.request()))
        let (first, _) = HTTPExchange.readResponses(v1, count: 1, timeout: 5)
        XCTAssertEqual(first.first?.text, "I'm pp\nFrom: 192.0.2.7:40000\n")

        let v2 = try connect(server.port)
        let header = ProxyHeaderParser.v2Signature + [0x21, 0x11, 0x00, 12, 203, 0, 113, 9, 127, 0, 0, 1, 0x30, 0x39, 0x00, 0x50]
        XCTAssertEqual(header.withUnsafeBytes { send(v2, $0.baseAddress, $0.count, 0) }, header.count)
        XCTAssertTrue(TestSocket.sendAll(v2, HTTPExchange.request() + HTTPExchange.request()))
        let (second, _) = HTTPExchange.readResponses(v2, count: 2, timeout: 5)
        XCTAssertEqual(second.map(\.text), ["I'm pp\nFrom: 203.0.113.9:12345\n", "I'm pp\nFrom: 203.0.113.9:12345\n"],
                       "the header is read once, at the start; every answer on the connection names it")

        let plain = try connect(server.port)
        XCTAssertTrue(TestSocket.sendAll(plain, HTTPExchange.request()))
        let (refused, _) = HTTPExchange.readResponses(plain, count: 1, timeout: 5)
        XCTAssertEqual(refused.first?.status, 400)
        XCTAssertEqual(TestSocket.waitForClose(plain, timeout: 3), .closed)
    }
}
