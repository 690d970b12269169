import Synchronization

/// `balance leastconn`: the open connections of one backend over every worker (connects in
/// progress included), shared by the workers like the rotation cursor; kept by the engine
/// across tables under the backend's name.
public final class BackendLoad: Sendable {
    private let open = Atomic<Int>(0)

    public init() {}

    public var current: Int { open.load(ordering: .relaxed) }

    @inline(__always) func add() { open.wrappingAdd(1, ordering: .relaxed) }
    @inline(__always) func remove() { open.wrappingSubtract(1, ordering: .relaxed) }
}

/// The leastconn rule. Pure.
public enum LeastConnections {
    /// The backend with the fewest open connections relative to its weight (`loads[i] /
    /// weights[i]`, compared without division), scanning from `start` so that equal backends
    /// take turns; weights must be positive.
    @inline(__always)
    public static func pick(count: Int, start: Int, load: (Int) -> Int, weight: (Int) -> Int) -> Int {
        var best = start % count
        var bestLoad = load(best)
        var bestWeight = weight(best)
        var step = 1
        while step < count {
            let index = (start + step) % count
            let candidateLoad = load(index)
            let candidateWeight = weight(index)
            if candidateLoad * bestWeight < bestLoad * candidateWeight {
                best = index
                bestLoad = candidateLoad
                bestWeight = candidateWeight
            }
            step += 1
        }
        return best
    }
}
