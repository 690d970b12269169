@testable import BerthEtcd
import Synchronization
import XCTest

/// The endpoint probe's sharing: many watch loops waiting on one endpoint ask once per period.
final class SharedAnswersTests: XCTestCase {
    func testConcurrentCallersShareOneAskAndALaterCallerAsksAgain() async {
        let answers = SharedAnswers<String>()
        let asked = Atomic<Int>(0)
        let ask: @Sendable () async -> Bool = {
            asked.add(1, ordering: .relaxed)
            try? await Task.sleep(for: .milliseconds(50))
            return true
        }
        let results = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<100 { group.addTask { await answers.answer(for: "a", maxAge: .seconds(5), ask: ask) } }
            return await group.reduce(into: [Bool]()) { $0.append($1) }
        }
        XCTAssertEqual(results, [Bool](repeating: true, count: 100))
        XCTAssertEqual(asked.load(ordering: .relaxed), 1, "100 callers within the period: one ask")

        _ = await answers.answer(for: "b", maxAge: .seconds(5), ask: ask)
        XCTAssertEqual(asked.load(ordering: .relaxed), 2, "another key is asked on its own")

        _ = await answers.answer(for: "a", maxAge: .milliseconds(1), ask: ask)
        XCTAssertEqual(asked.load(ordering: .relaxed), 3, "an answer older than maxAge is asked again")
    }

    func testAnAnswerThatChangedIsSeenAfterThePeriod() async {
        let answers = SharedAnswers<Int>()
        let value = Atomic<Bool>(false)
        let ask: @Sendable () async -> Bool = { value.load(ordering: .relaxed) }
        let first = await answers.answer(for: 1, maxAge: .seconds(60), ask: ask)
        XCTAssertFalse(first)
        value.store(true, ordering: .relaxed)
        let cached = await answers.answer(for: 1, maxAge: .seconds(60), ask: ask)
        XCTAssertFalse(cached, "within the period: the shared answer")
        let fresh = await answers.answer(for: 1, maxAge: .zero, ask: ask)
        XCTAssertTrue(fresh)
    }
}

/// Seeing a cut heal across two waits: the watchdog's probes fail, the attempt fails, the cut
/// heals, and the backoff wait that follows must see the endpoint's return at its first probe.
final class EndpointRecoveryTests: XCTestCase {
    let endpoint = EtcdEndpoint(host: "192.0.2.1", port: 2379, secure: false)

    func testAFailureJustBeforeTheWaitCountsAsUnreachable() async throws {
        let answers = SharedAnswers<EtcdEndpoint>()
        let reachable = Atomic<Bool>(false)
        let ask: @Sendable () async -> Bool = { reachable.load(ordering: .relaxed) }
        // The watchdog's last probe, during the cut.
        let during = await answers.answer(for: endpoint, maxAge: .zero, ask: ask)
        XCTAssertFalse(during)
        // Its answer is no longer shared when the wait begins: the wait asks afresh.
        try await Task.sleep(for: EndpointProbe.probeInterval + .milliseconds(50))
        reachable.store(true, ordering: .relaxed)  // the cut heals
        let started = ContinuousClock.now
        let recovered = try await EndpointProbe.waitForRecovery(
            of: endpoint, deadline: .now + .seconds(3), stop: { false }, answers: answers, ask: ask)
        XCTAssertTrue(recovered, "the wait ran to its deadline: the failure just before it was forgotten")
        XCTAssertLessThan(ContinuousClock.now - started, .seconds(2))
    }

    func testAnEndpointReachableAllAlongIsNotARecovery() async throws {
        let answers = SharedAnswers<EtcdEndpoint>()
        let recovered = try await EndpointProbe.waitForRecovery(
            of: endpoint, deadline: .now + .milliseconds(600), stop: { false }, answers: answers, ask: { true })
        XCTAssertFalse(recovered)
    }

    func testAFailureFromLongAgoIsForgotten() async throws {
        let answers = SharedAnswers<EtcdEndpoint>()
        let reachable = Atomic<Bool>(false)
        let ask: @Sendable () async -> Bool = { reachable.load(ordering: .relaxed) }
        _ = await answers.answer(for: endpoint, maxAge: .zero, ask: ask)
        XCTAssertTrue(answers.recentlyFalse(for: endpoint, within: .seconds(60)))
        reachable.store(true, ordering: .relaxed)
        try await Task.sleep(for: EndpointProbe.unreachableMemory + .milliseconds(100))
        XCTAssertFalse(answers.recentlyFalse(for: endpoint, within: EndpointProbe.unreachableMemory))
        let recovered = try await EndpointProbe.waitForRecovery(
            of: endpoint, deadline: .now + .milliseconds(600), stop: { false }, answers: answers, ask: ask)
        XCTAssertFalse(recovered, "a probe that failed long before the wait began is not this outage's")
        _ = await answers.answer(for: endpoint, maxAge: .zero, ask: ask)
        XCTAssertFalse(answers.recentlyFalse(for: endpoint, within: .seconds(60)), "the latest answer, yes, replaces the no")
    }

    func testAnEarlierAskThatAnswersLaterDoesNotOverrideTheLatest() async throws {
        let answers = SharedAnswers<EtcdEndpoint>()
        let endpoint = self.endpoint
        // A probe whose SYN was lost waits out its timeout and fails after a later one connected.
        let slowNo = Task { await answers.answer(for: endpoint, maxAge: .zero) {
            try? await Task.sleep(for: .milliseconds(300))
            return false
        } }
        try await Task.sleep(for: .milliseconds(50))
        let yes = await answers.answer(for: endpoint, maxAge: .zero) { true }
        XCTAssertTrue(yes)
        let no = await slowNo.value
        XCTAssertFalse(no)
        XCTAssertFalse(answers.recentlyFalse(for: endpoint, within: .seconds(60)),
                       "the earlier ask's late no replaced the later ask's yes")
    }
}
