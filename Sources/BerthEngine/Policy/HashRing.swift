import BerthSystem

/// `balance source`: a consistent hash ring over a frontend's candidate backends (Karger's ring,
/// as HAProxy's `hash-type consistent`). Each backend owns points on a 64-bit circle, in number
/// proportional to its weight; a client's address hashes to a point, and the first backend point
/// at or after it serves the client. A backend added or removed takes or gives back only the
/// clients whose points fall next to its own points: about its share, the others keep theirs
/// (a modulo hash would move almost every client). Built once per table on the control thread
/// and shared by the workers; a lookup is one hash and one binary search. Pure.
public struct HashRing: Sendable, Equatable {
    /// Points of the heaviest backend; lighter ones get proportionally fewer (at least 1).
    public static let pointsPerBackend = 160

    /// Sorted ring positions, and the candidate index owning each.
    let points: [UInt64]
    let owners: [Int32]

    /// A ring over backends named `names` (their identity: a backend keeps its points across
    /// tables whatever its position) with `weights`; nil when no weight is positive.
    public init?(names: [String], weights: [Int]) {
        precondition(names.count == weights.count)
        guard let heaviest = weights.max(), heaviest > 0 else { return nil }
        var entries: [(point: UInt64, owner: Int32)] = []
        for (index, name) in names.enumerated() where weights[index] > 0 {
            // Rounded to the nearest point count, never 0 for a positive weight.
            let share = (Double(weights[index]) * Double(Self.pointsPerBackend) / Double(heaviest)).rounded()
            let count = max(1, Int(share))
            let base = Self.hash(name)
            for replica in 0..<count {
                entries.append((Self.mix(base &+ UInt64(replica) &* 0x9E37_79B9_7F4A_7C15), Int32(index)))
            }
        }
        // Equal points (astronomically rare) are ordered by owner so that every build agrees.
        entries.sort { $0.point != $1.point ? $0.point < $1.point : $0.owner < $1.owner }
        points = entries.map(\.point)
        owners = entries.map(\.owner)
    }

    /// The candidate index serving the client whose address hashes to `key`.
    @inline(__always)
    public func owner(of key: UInt64) -> Int {
        var low = 0
        var high = points.count
        while low < high {
            let middle = (low + high) / 2
            if points[middle] < key { low = middle + 1 } else { high = middle }
        }
        return Int(owners[low == points.count ? 0 : low])
    }

    /// The key of a client: its host address only (every connection of a host lands on the same
    /// backend, whatever its source port).
    @inline(__always)
    public static func key(of client: SocketAddress) -> UInt64 {
        client.withHostBytes { bytes in mix(fnv1a(bytes)) }
    }

    static func hash(_ name: String) -> UInt64 {
        var copy = name
        return copy.withUTF8 { fnv1a(UnsafeRawBufferPointer($0)) }
    }

    /// FNV-1a, 64 bits.
    @inline(__always)
    static func fnv1a(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01B3
        }
        return hash
    }

    /// SplitMix64's finalizer: spreads FNV's clustered outputs over the whole circle.
    @inline(__always)
    static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
