import BerthRegistry
/// Why a key or value was skipped, counted per kind on the stats page.
public enum MalformedReason: Sendable, Hashable, CustomStringConvertible {
    case key(KeyError.Reason)
    case value(ValueError.Reason)

    public var description: String {
        switch self {
        case .key(let reason): "key: \(reason.rawValue)"
        case .value(let reason): "value: \(reason.rawValue)"
        }
    }
}

/// One skipped key/value, for the stats page and the log.
public struct MalformedEntry: Sendable, Equatable, CustomStringConvertible {
    public var key: String
    public var reason: MalformedReason
    /// The reason in words (never the whole value: it may be large or binary).
    public var detail: String
    public var revision: Int64

    public var description: String { "\(key) @\(revision): \(detail)" }
}

/// Counts of malformed keys and values since start, and the last few, bounded.
public struct MalformedLog: Sendable, Equatable {
    /// Every malformed event seen (puts and reset entries).
    public private(set) var total: UInt64 = 0
    public private(set) var byReason: [MalformedReason: UInt64] = [:]
    public let capacity: Int
    private var ring: [MalformedEntry] = []
    private var next = 0

    public init(capacity: Int = 64) {
        self.capacity = max(0, capacity)
    }

    mutating func add(_ entry: MalformedEntry) {
        total += 1
        byReason[entry.reason, default: 0] += 1
        guard capacity > 0 else { return }
        if ring.count < capacity {
            ring.append(entry)
        } else {
            ring[next] = entry
        }
        next = (next + 1) % capacity
    }

    /// The last `capacity` entries, oldest first.
    public var recent: [MalformedEntry] {
        guard ring.count == capacity, capacity > 0 else { return ring }
        return Array(ring[next...] + ring[..<next])
    }
}
