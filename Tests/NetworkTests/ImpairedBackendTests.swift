// Failure matrix, rows 3 to 5: a backend that accepts and never answers, a slow host (200 ms on
// every packet it sends), a lossy host (5 %). None of them may cost the client a failed request
// where berth can avoid it; where it cannot (no response-timeout), berth must close on time and
// count it.
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class ImpairedBackendTests: MatrixTestCase {
    /// 3. a2 is a SilentListener: the TCP check passes, every request sent to it waits forever.
    /// With --retry-on response-timeout (first byte within 1 s) no request fails; without it, with
    /// --server-timeout 2s, each request that lands there fails at about 2 s, counted as a timeout.
    func testBackendThatAcceptsAndNeverAnswers() throws {
        let scene = try makeScene(Scene.Options(silentA2: true))
        try scene.startDiscover()
        let silent = try XCTUnwrap(scene.silent)
        let local = "127.0.0.1", localStats = 1937
        try scene.startDiscover(label: "discover-no-response-timeout", bind: local, statsPort: localStats,
                                retry: ["--retry-on", "empty-response"], extra: ["--server-timeout", "2s"])

        // With response-timeout: the silent backend costs time (the first-byte timeout), never a failure.
        let retried = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        _ = waitUntil(timeout: 25, interval: 0.1) { retried.samples.count >= 40 }
        let first = retried.stop()
        let acceptedWithRetry = silent.accepted
        print("silent a2, --retry-on empty-response,response-timeout: \(LoadSummary(first)); a2 accepted \(acceptedWithRetry)")
        XCTAssertGreaterThanOrEqual(first.count, 40)
        XCTAssertEqual(first.filter(\.failed).map { $0.failure ?? "?" }, [], "requests failed with response-timeout")
        XCTAssertGreaterThan(acceptedWithRetry, 0, "no request reached the silent backend: the test proves nothing")
        XCTAssertLessThan(first.map(\.seconds).max() ?? 0, 2.0, "a request waited past the first-byte timeout (1 s) and then some")
        XCTAssertEqual(first.compactMap(\.answer).filter { $0 == "a2" }, [])

        // Without it: berth closes each request that landed on a2 at the server timeout.
        let plain = RequestLoad(bed: scene.bed, host: "client", address: local, port: Scene.listenPort)
        _ = waitUntil(timeout: 40, interval: 0.1) { plain.samples.count >= 16 }
        let second = plain.stop()
        let failed = second.filter(\.failed)
        print("silent a2, --retry-on empty-response, --server-timeout 2s: \(LoadSummary(second)); "
              + "failures after \(failed.map { milliseconds($0.seconds) })")
        XCTAssertGreaterThanOrEqual(second.count, 16)
        // Round robin over four backends: every fourth request lands on a2.
        XCTAssertGreaterThanOrEqual(failed.count, second.count / 4 - 1, "fewer failures than requests sent to the silent backend")
        XCTAssertLessThanOrEqual(failed.count, second.count / 4 + 1, "more failures than requests sent to the silent backend")
        for sample in failed {
            XCTAssertTrue((1.8...3.0).contains(sample.seconds), "a request to the silent backend ended after \(sample.seconds) s, not at the server timeout (2 s): \(sample.failure ?? "")")
            XCTAssertEqual(sample.failure, "empty response", "berth should close the client without an answer")
        }
        XCTAssertLessThan(second.filter { !$0.failed }.map(\.seconds).max() ?? 0, 1.0)
        // Counted: the frontend's and a2's timeouts (read until the last close is in).
        var last = ""
        let counted = waitUntil(timeout: 3, interval: 0.1) {
            guard let stats = try? scene.stats(local, localStats), let row = stats.backend(scene.backends["a2"]!) else { return false }
            last = "frontend timeouts \(stats.frontendTimeouts), a2 timeouts \(row.timeouts), a2 sessions \(row.totalSessions)"
            return stats.frontendTimeouts >= failed.count && row.timeouts >= failed.count
        }
        print("stats of the second berth: \(last)")
        XCTAssertNotNil(counted, "berth did not count the \(failed.count) server timeouts: \(last)")
    }

    /// 4. Every packet host a sends is held 200 ms; the check timeout is 1 s: nothing goes down.
    func testSlowBackendHostStaysUp() throws {
        let scene = try makeScene()
        try scene.startDiscover(checkTimeout: "1s")
        let aAddresses = ["a1", "a2"].map { scene.backends[$0]! }
        try scene.bed.delay("a", milliseconds: 200)
        let load = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        defer { load.stop() }
        var notUp: [String] = [], checkTimes: [Int] = []
        let end = monotonicSeconds() + 8
        while monotonicSeconds() < end {
            if let stats = try? scene.stats() {
                if stats.backends.count != 4 || stats.backends.contains(where: { $0.status != "UP" }) {
                    notUp.append(stats.summary(names: scene.names))
                }
                checkTimes += aAddresses.compactMap { stats.backend($0)?.checkMilliseconds }
            }
            usleep(200_000)
        }
        let samples = load.stop()
        let fromA = samples.filter { $0.answer?.hasPrefix("a") == true }, fromB = samples.filter { $0.answer?.hasPrefix("b") == true }
        let a = LoadSummary(fromA), b = LoadSummary(fromB)
        print("200 ms delay on a: all \(LoadSummary(samples))")
        print("200 ms delay on a: from a p50 \(milliseconds(a.p50)) p99 \(milliseconds(a.p99)) (\(a.count)); "
              + "from b p50 \(milliseconds(b.p50)) p99 \(milliseconds(b.p99)) (\(b.count)); a's check times \(Set(checkTimes).sorted()) ms")
        XCTAssertEqual(notUp, [], "a backend left the routing under a 200 ms delay")
        XCTAssertEqual(samples.filter(\.failed).map { $0.failure ?? "?" }, [])
        XCTAssertGreaterThan(fromA.count, 5)
        // The delay was real: SYN-ACK and answer each held 200 ms.
        XCTAssertGreaterThanOrEqual(a.p50, 0.4, "answers from a were not delayed")
        XCTAssertLessThan(a.p99, 1.0, "answers from a took longer than the delay explains")
        XCTAssertLessThan(b.p99, 0.3, "answers from b were slowed too")
    }

    /// 5. Host a drops 5 % of the packets it receives and of those it sends.
    func testLossyBackendHost() throws {
        let scene = try makeScene()
        try scene.startDiscover()
        try scene.bed.loss("a", percent: 5)
        let load = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        defer { load.stop() }
        var downSeen = 0
        // Until 200 requests were made (a lost SYN costs one of them a second, so how long that
        // takes varies), 40 s at most.
        let end = monotonicSeconds() + 40
        while monotonicSeconds() < end && load.samples.count < 200 {
            if let stats = try? scene.stats() { downSeen += stats.backends.filter { $0.status != "UP" }.count }
            usleep(200_000)
        }
        let samples = load.stop()
        let summary = LoadSummary(samples)
        let stats = try? scene.stats()
        print("5% loss on a: \(summary); a backend seen not UP in \(downSeen) of the stats polls; \(stats?.summary(names: scene.names) ?? "")")
        XCTAssertGreaterThanOrEqual(samples.count, 200, "fewer than 200 requests in 40 s")
        XCTAssertLessThanOrEqual(Double(summary.failed.count), 0.05 * Double(samples.count), "more than 5% of requests failed")
    }
}
