/// Smooth weighted round-robin (nginx's algorithm), as a precomputed schedule: one period of
/// picks, which the shared rotation cursor indexes, so that every worker follows one weighted
/// rotation with one atomic add and one array load per connection. Smooth: weights 5, 1, 1 give
/// a a b a c a a, never a burst of the heavy backend. Pure.
public enum WeightedSchedule {
    /// Longest period kept: weights whose sum (after dividing by their gcd) is larger are scaled
    /// down in proportion, every non-zero weight kept at 1 or more.
    public static let maximumPeriod = 4_096

    /// The period of picks (indices into `weights`) for the backends of weight > 0; nil when
    /// every such weight is equal (the plain rotation does the same, without a table) or when
    /// none is positive.
    public static func make(_ weights: [Int]) -> [Int32]? {
        let positive = weights.filter { $0 > 0 }
        guard let first = positive.first, positive.contains(where: { $0 != first }) || positive.count != weights.count else {
            return nil
        }
        var reduced = weights.map { max(0, $0) }
        let divisor = positive.reduce(0) { gcd($0, $1) }
        reduced = reduced.map { $0 / divisor }
        let total = reduced.reduce(0, +)
        if total > maximumPeriod {
            let scale = Double(maximumPeriod) / Double(total)
            reduced = reduced.map { $0 == 0 ? 0 : max(1, Int(Double($0) * scale)) }
        }
        let period = reduced.reduce(0, +)
        var current = [Int](repeating: 0, count: reduced.count)
        var picks: [Int32] = []
        picks.reserveCapacity(period)
        for _ in 0..<period {
            var best = -1
            for index in reduced.indices where reduced[index] > 0 {
                current[index] += reduced[index]
                if best < 0 || current[index] > current[best] { best = index }
            }
            current[best] -= period
            picks.append(Int32(best))
        }
        return picks
    }

    static func gcd(_ a: Int, _ b: Int) -> Int {
        var (x, y) = (a, b)
        while y != 0 { (x, y) = (y, x % y) }
        return x
    }
}
