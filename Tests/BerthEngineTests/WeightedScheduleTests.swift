import BerthEngine
import XCTest

/// The smooth weighted round-robin schedule (nginx's algorithm).
final class WeightedScheduleTests: XCTestCase {
    func testNginxsExampleIsSmooth() {
        XCTAssertEqual(WeightedSchedule.make([5, 1, 1]), [0, 0, 1, 0, 2, 0, 0])
        XCTAssertEqual(WeightedSchedule.make([3, 1]), [0, 0, 1, 0])
    }

    func testEveryBackendGetsItsShareOverOnePeriod() throws {
        for weights in [[5, 1, 1], [3, 1], [1, 2, 3, 4], [256, 1], [7, 0, 3], [100, 100, 1]] {
            let schedule = try XCTUnwrap(WeightedSchedule.make(weights), "\(weights)")
            let divisor = weights.filter { $0 > 0 }.reduce(0) { gcd($0, $1) }
            XCTAssertEqual(schedule.count, weights.reduce(0, +) / divisor, "\(weights)")
            for (index, weight) in weights.enumerated() {
                XCTAssertEqual(schedule.filter { $0 == Int32(index) }.count, weight / divisor, "\(weights): backend \(index)")
            }
            // Smooth: a backend of weight w in a period p never waits longer than about p/w.
            for (index, weight) in weights.enumerated() where weight > 0 {
                let positions = schedule.indices.filter { schedule[$0] == Int32(index) }
                let gaps = zip(positions, positions.dropFirst() + [positions[0] + schedule.count]).map { $1 - $0 }
                XCTAssertLessThanOrEqual(gaps.max() ?? 0, schedule.count / (weight / divisor) + 1, "\(weights): backend \(index) bursts")
            }
        }
    }

    func testEqualWeightsNeedNoScheduleAndZeroWeightsAreSkipped() {
        XCTAssertNil(WeightedSchedule.make([1, 1, 1]))
        XCTAssertNil(WeightedSchedule.make([7, 7]))
        XCTAssertNil(WeightedSchedule.make([0, 0]))
        XCTAssertNil(WeightedSchedule.make([]))
        XCTAssertEqual(WeightedSchedule.make([2, 0, 2]), [0, 2], "a weight of 0 takes no pick; gcd 2")
        XCTAssertEqual(WeightedSchedule.make([10, 20]), [1, 0, 1], "divided by the gcd")
    }

    func testHugeWeightSumsAreScaledDownKeepingEveryBackend() throws {
        let weights = [256] + [Int](repeating: 1, count: 999) + [255] + [Int](repeating: 3, count: 3_000)
        let schedule = try XCTUnwrap(WeightedSchedule.make(weights))
        XCTAssertLessThanOrEqual(schedule.count, WeightedSchedule.maximumPeriod + weights.count)
        XCTAssertEqual(Set(schedule).count, weights.count, "every backend keeps at least one pick")
        let heavy = schedule.filter { $0 == 0 }.count, light = schedule.filter { $0 == 1 }.count
        XCTAssertGreaterThan(heavy, light, "the heavy backend keeps a larger share")
    }

    private func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
}
