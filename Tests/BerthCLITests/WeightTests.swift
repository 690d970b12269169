import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `--backend HOST:PORT*WEIGHT`: a real `berth proxy` with two workers splits new connections
/// by weight, smoothly, one rotation across its workers; weight 0 takes none; bad weights are
/// refused.
final class WeightTests: BerthTestCase {
    private func answers(_ port: UInt16, count: Int) -> [String] {
        (0..<count).compactMap { _ in HTTPExchange.get(port)?.text.trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    func testWeightsSplitSequentialConnectionsSmoothlyAcrossWorkers() throws {
        let heavy = try startWhoami(id: "heavy"), light = try startWhoami(id: "light")
        let proxy = try startProxy(backends: ["\(heavy.address)*3", "\(light.address)*1"], options: ["--workers", "2"])
        let seen = answers(proxy.port, count: 40)
        print("weights 3,1: \(seen.map { $0 == "I'm heavy" ? "h" : "l" }.joined())")
        XCTAssertEqual(seen.count, 40)
        let heavyCount = seen.filter { $0 == "I'm heavy" }.count
        // 40 consecutive positions of a period of 4 (a probe may have taken a position first).
        XCTAssertEqual(heavyCount, 30, "\(seen)")
        let letters = seen.map { $0 == "I'm heavy" ? "h" : "l" }.joined()
        XCTAssertFalse(letters.contains("ll"), "the light backend twice in a row: \(letters)")
        XCTAssertFalse(letters.contains("hhhh"), "a burst to the heavy backend: \(letters)")

        let stats = try TestSocket.freePort("127.0.0.1")
        let shown = try startProxy(backends: ["\(heavy.address)*3", "\(light.address)*0"], options: ["--stats", "127.0.0.1:\(stats)"])
        XCTAssertEqual(Set(answers(shown.port, count: 10)), ["I'm heavy"], "weight 0 takes no new connection")
        let page = try HTTPProbe.get(port: Int(stats), path: "/stats.json")
        XCTAssertNotNil(page.range(of: #""weight"\s*:\s*3"#, options: .regularExpression), page)
        XCTAssertNotNil(page.range(of: #""weight"\s*:\s*0"#, options: .regularExpression), page)
    }

    func testBadWeightsAreRefused() throws {
        for bad in ["127.0.0.1:8080*257", "127.0.0.1:8080*-1", "127.0.0.1:8080*x", "127.0.0.1:8080*"] {
            let (ended, _, error) = try runBerth(["proxy", "--listen", "127.0.0.1:0", "--backend", bad])
            XCTAssertEqual(ended, .exited(64), "\(bad): \(error)")
            XCTAssertTrue(error.contains("weight"), "\(bad): \(error)")
        }
    }
}
