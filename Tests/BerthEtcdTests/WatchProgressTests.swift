@testable import BerthEtcd
import XCTest

/// WatchProgress's bookkeeping for endpoints that answer no progress request (etcd's gRPC
/// proxy): pure.
final class WatchProgressTests: XCTestCase {
    func testAStreamIsBehindOnlyWhenThePutItMissedIsStillMissedAtTheNextCheck() {
        let progress = WatchProgress(next: 11)
        XCTAssertNil(progress.behind(newest: [8]), "the newest put was delivered")
        XCTAssertNil(progress.behind(newest: [12]), "first seen undelivered: it may be on its way")
        progress.delivered(through: 12)
        XCTAssertNil(progress.behind(newest: [12]), "delivered since")
        XCTAssertNil(progress.behind(newest: [15]))
        XCTAssertEqual(progress.behind(newest: [16]).map { [$0.delivered, $0.latest] }, [12, 16],
                       "15 still undelivered a check later: stuck after 12")
        progress.delivered(through: 16)
        XCTAssertNil(progress.behind(newest: [16]))
        XCTAssertNil(progress.behind(newest: [nil]), "an empty range has nothing to miss")
    }

    /// Several ranges on one stream: each has its own resume point and its own stall record.
    func testRangesOfOneStreamAreTrackedApart() {
        let progress = WatchProgress(ranges: 3, next: 5)
        progress.delivered(1, through: 9)
        XCTAssertEqual([progress.next(of: 0), progress.next(of: 1), progress.next(of: 2)], [5, 10, 5])
        XCTAssertEqual(progress.earliestNext, 5)
        progress.delivered(0, through: 20)
        progress.delivered(2, through: 7)
        XCTAssertEqual(progress.earliestNext, 8)
        progress.delivered(2, through: 6)
        XCTAssertEqual(progress.next(of: 2), 8, "a replayed batch does not move a range back")

        // Range 1 misses a put, range 2 missed one that it then receives.
        XCTAssertNil(progress.behind(newest: [20, 12, 9]))
        progress.delivered(2, through: 9)
        XCTAssertEqual(progress.behind(newest: [20, 13, 9]).map { [$0.delivered, $0.latest] }, [9, 13],
                       "range 1 is still short of its put a check later")
    }

    /// The watches a stream creates are numbered 0, 1, 2... in order: the stream is established
    /// once each range has its own, and a number it did not ask for is an error.
    func testAStreamIsEstablishedWhenEveryRangeHasItsWatch() {
        let progress = WatchProgress(ranges: 3, next: 1)
        progress.beginStream()
        XCTAssertNil(progress.range(ofWatch: 1), "not created yet")
        XCTAssertEqual(progress.created(watch: 1), .waiting)
        XCTAssertEqual(progress.range(ofWatch: 1), 1)
        XCTAssertEqual(progress.created(watch: 1), .invalid, "created twice")
        XCTAssertEqual(progress.created(watch: 3), .invalid, "only three were asked for")
        XCTAssertEqual(progress.created(watch: -1), .invalid)
        XCTAssertEqual(progress.created(watch: 0), .waiting)
        XCTAssertEqual(progress.created(watch: 2), .established)
        progress.beginStream()
        XCTAssertNil(progress.range(ofWatch: 0), "a new stream's watches are its own")
        XCTAssertEqual(progress.created(watch: 0), .waiting)
    }

    func testLearningWhetherAnEndpointAnswersProgressRequests() {
        let progress = WatchProgress(next: 1)
        let endpoint = EtcdEndpoint(host: "127.0.0.1", port: 2379)
        progress.use(endpoint)
        XCTAssertNil(progress.answersProgress)
        XCTAssertTrue(progress.silenceMeansTrouble)
        progress.ignoresProgress()
        XCTAssertFalse(progress.silenceMeansTrouble, "a quiet stream on a proxy is not an outage")
        progress.use(endpoint)
        XCTAssertEqual(progress.answersProgress, false, "kept while the endpoint is the same")
        progress.use(EtcdEndpoint(host: "127.0.0.1", port: 2380))
        XCTAssertNil(progress.answersProgress, "forgotten for another endpoint")
        progress.answersProgressRequests()
        XCTAssertEqual(progress.answersProgress, true)
        XCTAssertTrue(progress.stallCheckDue(every: .seconds(30)))
        XCTAssertFalse(progress.stallCheckDue(every: .seconds(30)), "one check per period")
        progress.touch()
        XCTAssertTrue(progress.stallCheckDue(every: .seconds(30)), "a message starts the period again")
    }
}
