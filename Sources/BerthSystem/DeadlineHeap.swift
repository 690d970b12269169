/// A binary min-heap of (deadline, slot, generation): the timers of one event loop.
///
/// Entries are never removed early. A session keeps at most one live entry (it remembers the
/// deadline it armed); when an entry comes due the loop compares it with the session's current
/// state and either fires, re-arms for the later deadline, or drops it as stale (the slot's
/// generation changed). That keeps activity on the hot path to a plain store. Pure.
public struct DeadlineHeap {
    public struct Entry: Equatable {
        public var deadline: Int64
        public var slot: Int32
        public var generation: UInt32

        public init(deadline: Int64, slot: Int32, generation: UInt32) {
            self.deadline = deadline
            self.slot = slot
            self.generation = generation
        }
    }

    private var entries: [Entry] = []

    public init() {}

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }
    public var earliest: Int64? { entries.first?.deadline }

    public mutating func insert(_ entry: Entry) {
        entries.append(entry)
        var child = entries.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard entries[child].deadline < entries[parent].deadline else { break }
            entries.swapAt(child, parent)
            child = parent
        }
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    public mutating func popDue(now: Int64) -> Entry? {
        guard let first = entries.first, first.deadline <= now else { return nil }
        let last = entries.removeLast()
        if !entries.isEmpty {
            entries[0] = last
            siftDown(from: 0)
        }
        return first
    }

    private mutating func siftDown(from start: Int) {
        var parent = start
        let count = entries.count
        while true {
            let left = 2 * parent + 1
            if left >= count { return }
            var smallest = left
            let right = left + 1
            if right < count && entries[right].deadline < entries[left].deadline { smallest = right }
            guard entries[smallest].deadline < entries[parent].deadline else { return }
            entries.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
