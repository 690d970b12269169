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
