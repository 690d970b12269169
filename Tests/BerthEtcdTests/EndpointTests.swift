import XCTest
@testable import BerthEtcd

final class EndpointTests: XCTestCase {
    func testParsesSchemesHostsAndPorts() throws {
        XCTAssertEqual(try EtcdEndpoint.parse("http://10.0.0.1:2379"), EtcdEndpoint(host: "10.0.0.1", port: 2379))
        XCTAssertEqual(try EtcdEndpoint.parse("https://etcd.local:4001/"), EtcdEndpoint(host: "etcd.local", port: 4001, secure: true))
        XCTAssertEqual(try EtcdEndpoint.parse("127.0.0.1:4001"), EtcdEndpoint(host: "127.0.0.1", port: 4001))
        XCTAssertEqual(try EtcdEndpoint.parse("etcd"), EtcdEndpoint(host: "etcd", port: 2379))
        XCTAssertEqual(try EtcdEndpoint.parse("[::1]:2379"), EtcdEndpoint(host: "::1", port: 2379))
        XCTAssertEqual(try EtcdEndpoint.parse("http://[fe80::1]"), EtcdEndpoint(host: "fe80::1", port: 2379))
        XCTAssertEqual(try EtcdEndpoint.parseList(" http://a:1, b:2 ,").map(\.description), ["http://a:1", "http://b:2"])
        XCTAssertEqual(EtcdEndpoint(host: "::1", port: 5).description, "http://[::1]:5")
    }

    func testRejectsMalformedEndpointsWithAReason() {
        for (text, reason) in [("", "no endpoint"), ("ftp://a:1", "scheme"), ("a:0", "not a port"), ("a:99999", "not a port"),
                               ("a:b", "not a port"), ("::1:2379", "brackets"), ("[::1", "unclosed"), ("http://a:1/v3", "no path"),
                               (":2379", "no host")] {
            XCTAssertThrowsError(try EtcdEndpoint.parseList(text), text) { error in
                XCTAssertTrue("\(error)".contains(reason), "\(text): \(error)")
            }
        }
    }

    func testRangeEndOfPrefix() {
        XCTAssertEqual(EtcdClient.rangeEnd(ofPrefix: "/backends/"), Array("/backends0".utf8))
        XCTAssertEqual(EtcdClient.rangeEnd(ofPrefix: "a\u{7f}"), [97, 128])
        XCTAssertEqual(EtcdClient.rangeEnd(ofPrefix: ""), [0])
    }

    func testBackoffGrowsToItsCapWithJitter() {
        var backoff = Backoff(.init(initial: .milliseconds(100), maximum: .milliseconds(800)))
        var delays: [Duration] = []
        for _ in 0..<6 { delays.append(backoff.nextDelay()) }
        let bases: [Int64] = [100, 200, 400, 800, 800, 800]
        for (delay, base) in zip(delays, bases) {
            XCTAssertGreaterThanOrEqual(delay, .milliseconds(base / 2))
            XCTAssertLessThanOrEqual(delay, .milliseconds(base))
        }
        backoff.reset()
        XCTAssertLessThanOrEqual(backoff.nextDelay(), .milliseconds(100))
    }
}
