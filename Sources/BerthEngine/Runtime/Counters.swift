import BerthSystem
import Synchronization

/// Traffic counters of one frontend or one backend, on one worker.
///
/// Written only by the worker that owns them (a relaxed load and store, no lock, no read-modify-write
/// bus lock); read by any thread, which sums the workers' copies when asked.
public final class TrafficCounters: Sendable {
    let currentSessions = Atomic<Int>(0)
    let maxSessions = Atomic<Int>(0)
    let totalSessions = Atomic<UInt64>(0)
    let bytesIn = Atomic<UInt64>(0)
    let bytesOut = Atomic<UInt64>(0)
    let connectErrors = Atomic<UInt64>(0)
    let retries = Atomic<UInt64>(0)
    let failedSessions = Atomic<UInt64>(0)
    let timeouts = Atomic<UInt64>(0)
    let redispatches = Atomic<UInt64>(0)
    let panicSessions = Atomic<UInt64>(0)
    /// Monotonic ms (the worker's cached loop time) of the last session started; 0: none yet.
    let lastSessionStarted = Atomic<Int64>(0)

    init() {}

    var snapshot: TrafficSnapshot {
        var snapshot = TrafficSnapshot()
        snapshot.currentSessions = currentSessions.load(ordering: .relaxed)
        snapshot.maxSessions = maxSessions.load(ordering: .relaxed)
        snapshot.lastSessionStarted = lastSessionStarted.load(ordering: .relaxed)
        for counter in TrafficCounter.all { snapshot.counts[counter] = counter.load(self) }
        return snapshot
    }

    /// `now` is the worker's cached loop time: one more relaxed store, no clock read.
    @inline(__always) func sessionStarted(at now: Int64) {
        lastSessionStarted.store(now, ordering: .relaxed)
        let current = currentSessions.load(ordering: .relaxed) + 1
        currentSessions.store(current, ordering: .relaxed)
        if current > maxSessions.load(ordering: .relaxed) { maxSessions.store(current, ordering: .relaxed) }
        add(totalSessions, 1)
    }

    @inline(__always) func sessionEnded() {
        currentSessions.store(currentSessions.load(ordering: .relaxed) - 1, ordering: .relaxed)
    }

    @inline(__always) func countBytes(_ amount: UInt64, fromClient: Bool) {
        if fromClient { add(bytesIn, amount) } else { add(bytesOut, amount) }
    }

    /// Single-writer increment: no atomic read-modify-write needed.
    @inline(__always) func add(_ counter: borrowing Atomic<UInt64>, _ amount: UInt64) {
        counter.store(counter.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
    }
}

/// A point-in-time copy of counters, summed over workers by `Engine.statistics()`. The counters
/// are `counts` (`TrafficCounter.all`), readable by name: `snapshot.connectErrors`.
@dynamicMemberLookup
public struct TrafficSnapshot: Sendable, Equatable {
    public var currentSessions = 0
    /// Highest `currentSessions` seen (summed over workers: an upper bound).
    public var maxSessions = 0
    /// `MonotonicClock.milliseconds()` when the last session started (the latest over workers);
    /// 0 when none has.
    public var lastSessionStarted: Int64 = 0
    public var counts = TrafficCounts()

    public init() {}

    public subscript(dynamicMember member: KeyPath<TrafficCounter.Type, TrafficCounter>) -> UInt64 {
        get { counts[TrafficCounter.self[keyPath: member]] }
        set { counts[TrafficCounter.self[keyPath: member]] = newValue }
    }

    mutating func accumulate(_ other: TrafficSnapshot) {
        currentSessions += other.currentSessions
        maxSessions += other.maxSessions
        counts.add(other.counts)
        lastSessionStarted = max(lastSessionStarted, other.lastSessionStarted)
    }
}

public struct FrontendStatistics: Sendable, Equatable {
    public var traffic = TrafficSnapshot()
    /// Keyed by backend name.
    public var backends: [String: TrafficSnapshot] = [:]
}

public struct EngineStatistics: Sendable {
    public var frontends: [String: FrontendStatistics] = [:]
    /// Open client connections per worker.
    public var sessionsPerWorker: [Int] = []
    /// Pipes lent per worker (only connections moving data hold one).
    public var pipesInUse: [Int] = []
    /// Times a worker paused accepting (fd exhaustion or maxconn).
    public var acceptPauses: UInt64 = 0
    /// Event-loop system calls that failed and were survived: an epoll_wait error (the loop
    /// backs off 10 ms), a listener epoll_ctl(ADD) refused (ENOSPC from max_user_watches,
    /// ENOMEM: accepting pauses and is tried again).
    public var loopErrors: UInt64 = 0
    public var revision: UInt64 = 0
    /// The connection log's records written and dropped (a worker's ring was full); nil
    /// without a connection log.
    public var connectionLogWritten: UInt64?
    public var connectionLogDropped: UInt64?
}

/// The counters a worker has registered, for readers on other threads.
/// Locked only when the worker installs a table and when statistics are read.
final class CounterRegistry: Sendable {
    struct Key: Hashable, Sendable {
        var frontend: String
        var backend: String?
    }

    let entries = Mutex<[Key: TrafficCounters]>([:])
    let sessions = Atomic<Int>(0)
    let pipesInUse = Atomic<Int>(0)
    let acceptPauses = Atomic<UInt64>(0)
    let loopErrors = Atomic<UInt64>(0)

    func counters(frontend: String, backend: String?) -> TrafficCounters {
        entries.withLock { entries in
            let key = Key(frontend: frontend, backend: backend)
            if let existing = entries[key] { return existing }
            let created = TrafficCounters()
            entries[key] = created
            return created
        }
    }

    /// Drops the counters of backends and frontends that left the table and carry no session.
    func remove(_ keys: [Key]) {
        guard !keys.isEmpty else { return }
        entries.withLock { entries in
            for key in keys { entries.removeValue(forKey: key) }
        }
    }
}
