import BerthEngine
import BerthSystem
import XCTest

/// The pure parts of `balance source` and `balance leastconn`: the hash ring and the leastconn
/// comparison, with the share of clients moved measured against a modulo hash.
final class BalancingModeTests: XCTestCase {
    /// 100,000 distinct client hosts (10.x.y.z, one port).
    private let keys: [UInt64] = (0..<100_000).map { (index: Int) -> UInt64 in
        let high = UInt8(truncatingIfNeeded: index >> 16), middle = UInt8(truncatingIfNeeded: index >> 8)
        let low = UInt8(truncatingIfNeeded: index)
        return HashRing.key(of: SocketAddress(ipv4: (10, high, middle, low), port: 40_000))
    }

    private func names(_ count: Int) -> [String] { (0..<count).map { "backend-\($0)" } }

    private func assignment(_ names: [String], weights: [Int]? = nil) -> [String] {
        let ring = HashRing(names: names, weights: weights ?? names.map { _ in 1 })!
        return keys.map { names[ring.owner(of: $0)] }
    }

    private func share(_ moved: Int) -> Double { Double(moved) / Double(keys.count) }

    func testRemovingOneOfTenBackendsMovesOnlyItsClients() {
        let before = assignment(names(10))
        let remaining = names(10).filter { $0 != "backend-3" }
        let after = assignment(remaining)
        let moved = zip(before, after).filter { $0 != $1 }
        XCTAssertTrue(moved.allSatisfy { $0.0 == "backend-3" }, "a client of another backend moved")
        let removedShare = share(before.filter { $0 == "backend-3" }.count)
        XCTAssertEqual(share(moved.count), removedShare, "every client of the removed backend moves, and only those")
        XCTAssertTrue((0.06...0.14).contains(removedShare), "backend-3 held \(removedShare) of the clients, not about a tenth")
        // What a modulo hash does to the same clients.
        // Modulo 10 -> 9: a client moves when its new index names another backend than before
        // (the backends after the removed one shift down by one).
        let modulo = keys.filter { key in
            let old = Int(key % 10), new = Int(key % 9)
            return old == 3 || new != (old < 3 ? old : old - 1)
        }.count
        print("source hash, 10 -> 9 backends: \(String(format: "%.1f", share(moved.count) * 100))% of 100,000 clients moved "
              + "(the removed backend's share); a modulo hash would move \(String(format: "%.1f", share(modulo) * 100))%")
        XCTAssertGreaterThan(share(modulo), 0.8)
    }

    func testAddingAnEleventhBackendTakesOnlyItsShare() {
        let before = assignment(names(10))
        let after = assignment(names(11))
        let moved = zip(before, after).filter { $0 != $1 }
        XCTAssertTrue(moved.allSatisfy { $0.1 == "backend-10" }, "a client moved elsewhere than to the new backend")
        let modulo = keys.filter { $0 % 10 != $0 % 11 }.count
        print("source hash, 10 -> 11 backends: \(String(format: "%.1f", share(moved.count) * 100))% moved, all to the new one "
              + "(ideal 9.1%); a modulo hash would move \(String(format: "%.1f", share(modulo) * 100))%")
        XCTAssertTrue((0.05...0.14).contains(share(moved.count)), "\(share(moved.count))")
    }

    func testSharesFollowWeightsAndEveryBackendGetsSome() {
        let equal = Dictionary(grouping: assignment(names(10)), by: { $0 }).mapValues { share($0.count) }
        XCTAssertEqual(equal.count, 10)
        XCTAssertTrue(equal.values.allSatisfy { (0.06...0.14).contains($0) }, "\(equal)")
        let weighted = Dictionary(grouping: assignment(names(3), weights: [1, 1, 2]), by: { $0 }).mapValues { share($0.count) }
        XCTAssertEqual(weighted["backend-2"]!, 0.5, accuracy: 0.08, "\(weighted)")
        XCTAssertEqual(weighted["backend-0"]!, 0.25, accuracy: 0.07, "\(weighted)")
        // Weight 0 owns nothing; no positive weight, no ring.
        XCTAssertFalse(assignment(names(3), weights: [1, 0, 1]).contains("backend-1"))
        XCTAssertNil(HashRing(names: ["a"], weights: [0]))
    }

    func testTheKeyIsTheHostNotThePort() throws {
        let one = try SocketAddress(parsing: "192.0.2.7:1000"), other = try SocketAddress(parsing: "192.0.2.7:61000")
        XCTAssertEqual(HashRing.key(of: one), HashRing.key(of: other))
        XCTAssertNotEqual(HashRing.key(of: one), HashRing.key(of: try SocketAddress(parsing: "192.0.2.8:1000")))
        XCTAssertEqual(HashRing.key(of: try SocketAddress(parsing: "[2001:db8::1]:1")),
                       HashRing.key(of: try SocketAddress(parsing: "[2001:db8::1]:2")))
        // The ring depends on names, not on their order in the table.
        let forward = HashRing(names: ["a", "b", "c"], weights: [1, 1, 1])!
        let backward = HashRing(names: ["c", "b", "a"], weights: [1, 1, 1])!
        let labels = ["a", "b", "c"], reversed = ["c", "b", "a"]
        for key in keys.prefix(1000) { XCTAssertEqual(labels[forward.owner(of: key)], reversed[backward.owner(of: key)]) }
    }

    func testLeastConnectionsPicksTheLowestLoadPerWeightAndRotatesTies() {
        func pick(_ loads: [Int], _ weights: [Int], start: Int) -> Int {
            LeastConnections.pick(count: loads.count, start: start, load: { loads[$0] }, weight: { weights[$0] })
        }
        XCTAssertEqual(pick([3, 1, 2], [1, 1, 1], start: 0), 1)
        XCTAssertEqual(pick([3, 1, 1], [1, 1, 1], start: 0), 1)
        XCTAssertEqual(pick([3, 1, 1], [1, 1, 1], start: 2), 2, "ties go to the first from the rotation's start")
        XCTAssertEqual(pick([0, 0, 0], [1, 1, 1], start: 4), 1)
        XCTAssertEqual(pick([2, 1], [3, 1], start: 1), 0, "2 open at weight 3 is less loaded than 1 at weight 1")
        XCTAssertEqual(pick([3, 1], [3, 1], start: 1), 1)
        XCTAssertEqual(pick([3, 1], [3, 1], start: 0), 0)
        XCTAssertEqual(pick([5], [1], start: 7), 0)
    }
}
