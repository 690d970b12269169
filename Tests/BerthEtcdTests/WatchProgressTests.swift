@testable import BerthEtcd
import XCTest

/// WatchProgress's bookkeeping for endpoints that answer no progress request (etcd's gRPC
/// proxy): pure.
final class WatchProgressTests: XCTestCase {
    func testAStreamIsBehindOnlyWhenThePutItMissedIsStillMissedAtTheNextCheck() {
        let progress = WatchProgress(next: 11)
        XCTAssertNil(progress.behind(newest: 8), "the newest put was delivered")
        XCTAssertNil(progress.behind(newest: 12), "first seen undelivered: it may be on its way")
        progress.delivered(through: 12)
        XCTAssertNil(progress.behind(newest: 12), "delivered since")
        XCTAssertNil(progress.behind(newest: 15))
        XCTAssertEqual(progress.behind(newest: 16), 12, "15 still undelivered a check later: stuck after 12")
        progress.delivered(through: 16)
        XCTAssertNil(progress.behind(newest: 16))
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
