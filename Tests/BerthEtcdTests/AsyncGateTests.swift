@testable import BerthEtcd
import Synchronization
import XCTest

/// The gate of the watch streams' resume reads: a few at a time, cancellable while waiting.
final class AsyncGateTests: XCTestCase {
    func testNoMoreThanTheLimitRunAtOnceAndEveryoneRuns() async throws {
        let gate = AsyncGate(limit: 3)
        let counts = Counts()
        let done = try await withThrowingTaskGroup(of: Int.self) { group in
            for index in 0..<40 {
                group.addTask {
                    try await gate.run {
                        let now = counts.inside.add(1, ordering: .relaxed).newValue
                        _ = counts.most.max(now, ordering: .relaxed)
                        try await Task.sleep(for: .milliseconds(2))
                        counts.inside.subtract(1, ordering: .relaxed)
                        return index
                    }
                }
            }
            return try await group.reduce(into: Set<Int>()) { $0.insert($1) }
        }
        XCTAssertEqual(done, Set(0..<40))
        XCTAssertEqual(counts.most.load(ordering: .relaxed), 3, "three at a time, and three did run together")
        XCTAssertEqual(gate.running, 0)
    }

    func testACancelledWaiterLeavesAndTakesNoPlace() async throws {
        let gate = AsyncGate(limit: 1)
        let (released, release) = AsyncStream.makeStream(of: Void.self)
        let holder = Task {
            try await gate.run {
                for await _ in released { break }
            }
        }
        while gate.running == 0 { try await Task.sleep(for: .milliseconds(1)) }
        let waiter = Task { try await gate.run { "ran" } }
        try await Task.sleep(for: .milliseconds(20))
        waiter.cancel()
        do {
            _ = try await waiter.value
            XCTFail("a cancelled waiter ran")
        } catch {
            XCTAssertTrue(error is CancellationError, "\(error)")
        }
        release.yield()
        try await holder.value
        XCTAssertEqual(gate.running, 0)
        // The place the cancelled waiter had asked for is free: the next one runs at once.
        let next = try await gate.run { "next" }
        XCTAssertEqual(next, "next")
    }
}

private final class Counts: Sendable {
    let inside = Atomic<Int>(0)
    let most = Atomic<Int>(0)
}
