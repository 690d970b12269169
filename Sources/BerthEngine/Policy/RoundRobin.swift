import BerthSystem
import Synchronization

/// The round-robin position of one frontend, shared by every worker, so that the rotation is one
/// sequence across threads (with two workers, sequential connections still alternate exactly).
///
/// It outlives routing tables: a new backend set continues the rotation where the old one was.
public final class RoundRobinCursor: Sendable {
    private let position = Atomic<UInt64>(0)

    public init() {}

    /// Takes the next position of the rotation (one atomic add per new connection).
    @inline(__always)
    public func next() -> UInt64 {
        position.wrappingAdd(1, ordering: .relaxed).oldValue
    }
}

/// Which backend a connection tries: the rotation position picks the first, and each retry moves
/// to the next one in order, so a retry never lands on the backend that just failed unless every
/// other one failed too. Pure.
public enum RoundRobin {
    @inline(__always)
    public static func index(position: UInt64, attempt: Int, count: Int) -> Int {
        precondition(count > 0)
        return Int((position &+ UInt64(attempt)) % UInt64(count))
    }
}
