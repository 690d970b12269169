/// The core every event loop of Berth is built on (the data-plane workers, the health checker,
/// whoami): one epoll instance, the eventfd that wakes it from other threads, a deadline heap,
/// and one token scheme for what is registered. Owned by the loop's thread.
///
/// Tokens: `generation << 32 | slot << 2 | kind`. Kind 0, slot 0, generation 0 is the wake-up;
/// the other three kinds are the loop's own (listener, client, backend; probe; connection).
/// A slot's generation changes whenever what it holds changes, so an event queued for a socket
/// that was closed (and whose fd number may already be reused) carries an old generation and is
/// dropped by `SlotTable.lookup`.
public struct EventLoopCore: ~Copyable {
    public var epoll: Epoll
    public let wakeup: WakeupSignal
    public var timers = DeadlineHeap()

    /// The longest single wait, so that a loop looks at its clock at least this often.
    public static let maximumWait: Int64 = 60_000

    public init(capacity: Int, wakeup: WakeupSignal) throws(SystemError) {
        let epoll = try Epoll(capacity: capacity)
        try epoll.add(wakeup.fd, events: Epoll.readable, token: EventToken.wakeup)
        self.epoll = epoll
        self.wakeup = wakeup
    }

    deinit {
        epoll.remove(wakeup.fd)
    }

    /// How long `wait` may block: until the earliest timer or `extra` (monotonic ms), 0 when
    /// `busy`, -1 (forever) when nothing is due; at most `maximumWait`.
    public func timeout(until extra: Int64 = .max, busy: Bool = false) -> CInt {
        if busy { return 0 }
        let earliest = min(timers.earliest ?? .max, extra)
        if earliest == .max { return -1 }
        let wait = earliest - MonotonicClock.milliseconds()
        return CInt(clamping: max(0, min(wait, Self.maximumWait)))
    }

    /// Waits for events (see `timeout`) and returns how many are ready (`epoll.event(at:)`).
    public func wait(until extra: Int64 = .max, busy: Bool = false) throws(SystemError) -> Int {
        try epoll.wait(timeout: timeout(until: extra, busy: busy))
    }
}

/// Epoll registration tokens (see `EventLoopCore`).
public enum EventToken {
    /// The loop's wake-up eventfd.
    public static let wakeup: UInt64 = 0

    @inline(__always)
    public static func make(kind: UInt64, slot: Int32, generation: UInt32) -> UInt64 {
        UInt64(generation) << 32 | UInt64(UInt32(bitPattern: slot)) << 2 | (kind & 3)
    }

    @inline(__always) public static func kind(_ token: UInt64) -> UInt64 { token & 3 }
    @inline(__always) public static func slot(_ token: UInt64) -> Int { Int((token >> 2) & 0x3FFF_FFFF) }
    @inline(__always) public static func generation(_ token: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: token >> 32) }
}

/// What a `SlotTable` holds: an object that knows its slot and the slot's current generation.
public protocol Slotted: AnyObject {
    var slot: Int32 { get }
    var generation: UInt32 { get set }
    /// In use (false once released, until the slot is handed out again).
    var isLive: Bool { get }
}

/// A loop's objects by slot, reused under a new generation: the token table of `EventLoopCore`.
/// The slot freed last is handed out first (a stack); objects are kept for reuse.
public struct SlotTable<Element: Slotted> {
    public private(set) var elements: [Element] = []
    private var free: [Int32] = []

    public init() {}

    /// A free element (its `isLive` is still false: the caller fills it), or a new one made by
    /// `make` for the next slot.
    @inline(__always)
    public mutating func take(orMake make: (Int32) -> Element) -> Element {
        if let slot = free.popLast() { return elements[Int(slot)] }
        let element = make(Int32(elements.count))
        elements.append(element)
        return element
    }

    /// Gives a slot back: its generation changes, so every token and timer entry issued for it
    /// so far is stale. The caller has closed what the element held.
    @inline(__always)
    public mutating func release(_ element: Element) {
        element.generation &+= 1
        free.append(element.slot)
    }

    /// The live element a token or timer entry names, or nil when it is stale.
    @inline(__always)
    public func lookup(slot: Int, generation: UInt32) -> Element? {
        guard slot < elements.count else { return nil }
        let element = elements[slot]
        guard element.generation == generation, element.isLive else { return nil }
        return element
    }

    @inline(__always)
    public func lookup(token: UInt64) -> Element? {
        lookup(slot: EventToken.slot(token), generation: EventToken.generation(token))
    }

    @inline(__always)
    public func lookup(_ entry: DeadlineHeap.Entry) -> Element? {
        lookup(slot: Int(entry.slot), generation: entry.generation)
    }

    /// Every element in use, without copying the table: releasing an element while iterating is
    /// fine (a release touches only the free list).
    public var live: LazyFilterSequence<[Element]> { elements.lazy.filter(\.isLive) }
}
