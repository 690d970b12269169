@testable import BerthEngine
import XCTest

/// NameMatcher against a dictionary: pure.
final class NameMatcherTests: XCTestCase {
    func testAgreesWithADictionaryWhateverTheOrder() {
        var generator = SystemRandomNumberGenerator()
        var dictionaryBuilds = 0
        for round in 0..<2_000 {
            let count = Int.random(in: 0..<30, using: &generator)
            var previous = Array(Set((0..<count).map { _ in "s\(Int.random(in: 0..<60, using: &generator))" })).sorted()
            let sortedPrevious = round % 4 != 0
            if !sortedPrevious { previous.shuffle(using: &generator) }
            // The new table: some removed, some added, sorted (discovery) or not (a proxy table).
            var next = previous.filter { _ in Int.random(in: 0..<6, using: &generator) != 0 }
            for _ in 0..<Int.random(in: 0..<4, using: &generator) { next.append("n\(Int.random(in: 0..<60, using: &generator))") }
            next = Array(Set(next))
            if round % 3 != 0 { next.sort() } else { next.shuffle(using: &generator) }
            let expected = Dictionary(uniqueKeysWithValues: previous.enumerated().map { ($1, $0) })
            var matcher = NameMatcher(previous: previous)
            for name in next {
                XCTAssertEqual(matcher.position(of: name), expected[name], "round \(round): \(name) in \(previous) -> \(next)")
            }
            XCTAssertEqual(matcher.matchedAll, Set(previous).isSubset(of: Set(next)), "round \(round)")
            if matcher.builtIndex { dictionaryBuilds += 1 }
        }
        XCTAssertLessThan(dictionaryBuilds, 1_000, "sorted tables are matched without a dictionary")
    }

    func testSortedTablesWithInsertionsAndRemovalsNeedNoDictionary() {
        let previous = (0..<100).map { "service\(String(format: "%03d", $0))" }
        var next = previous
        next.remove(at: 40)
        next.remove(at: 70)
        next.insert("service0405", at: 40)
        next.append("service999")
        var matcher = NameMatcher(previous: previous)
        for name in next { XCTAssertEqual(matcher.position(of: name), previous.firstIndex(of: name)) }
        XCTAssertFalse(matcher.builtIndex)
        XCTAssertFalse(matcher.matchedAll)
    }
}
