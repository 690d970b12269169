import BerthSystem
import Glibc
import Synchronization

/// A frontend as one worker sees it: the backends it may pick from now, its shared rotation and
/// its counters. Rebuilt fields are replaced in place when a new table is installed, so open
/// sessions keep pointing at a live object.
final class FrontendRuntime {
    let name: String
    let cursor: RoundRobinCursor
    let counters: TrafficCounters
    var settings: FrontendSettings
    /// Every backend of the table (identity and counters of open sessions).
    var backends: [BackendRuntime] = []
    /// The enabled ones of weight > 0: the round-robin rotation runs over these.
    var candidates: [BackendRuntime] = []
    /// With unequal weights: one period of the smooth weighted rotation (indices into
    /// `candidates`; `WeightedSchedule`); nil: the plain rotation.
    var schedule: [Int32]?
    /// `balance source`: the consistent hash ring over `candidates`.
    var ring: HashRing?
    var listener = Descriptor.none
    /// Further sockets of the listener group this worker accepts on: only after a takeover that
    /// handed over more sockets than this engine has workers (none of them may be closed while
    /// it may hold queued connections). Registered and closed with `listener`.
    var extraListeners = DescriptorBatch()
    var listenerRegistered = false
    var removed = false
    /// The frontend as last installed: a table giving it again unchanged leaves it as it is.
    var spec: Frontend?

    init(name: String, cursor: RoundRobinCursor, counters: TrafficCounters, settings: FrontendSettings) {
        self.name = name
        self.cursor = cursor
        self.counters = counters
        self.settings = settings
    }
}

final class BackendRuntime {
    /// Replaced in place when only `enabled` changes.
    var backend: Backend
    let counters: TrafficCounters
    /// Left the table: no new connections; open ones drain.
    var removed = false
    /// Failed connects in a row on this worker (passive health, `observeErrors`).
    var consecutiveFailures = 0
    /// `balance leastconn`: its open connections over every worker (nil: not counted).
    var load: BackendLoad?

    init(backend: Backend, counters: TrafficCounters) {
        self.backend = backend
        self.counters = counters
    }
}

/// What the control plane sends a worker (through `WorkerHandle.post`).
enum WorkerCommand: Sendable {
    /// Serve `table`; `listeners` are freshly bound (or adopted) sockets (raw fds, owned by the
    /// message until the worker adopts them) for frontends that are new or moved to another
    /// address: one each, more only after a takeover from an engine with more workers.
    case install(PublishedTable, listeners: [String: [CInt]])
    /// Stop accepting, let connections finish until `deadline` (monotonic ms), then exit.
    case stop(deadline: Int64)
}

/// The immutable table a worker installs: the routing table plus the shared rotation cursors
/// and leastconn counters, and what is precomputed for the balancing modes.
///
/// Immutable while anyone but the engine holds it: `surrender` empties it only when the engine
/// holds the sole reference (every worker has installed it).
final class PublishedTable: @unchecked Sendable {
    private(set) var table: RoutingTable
    let cursors: [String: RoundRobinCursor]
    /// Per leastconn frontend, per backend name: its open connections over every worker.
    let loads: [String: [String: BackendLoad]]
    /// Per frontend (in the table's order), round-robin with unequal weights: its smooth
    /// weighted schedule over the candidates (`isCandidate`), built once here on the control
    /// thread and shared by every worker.
    private(set) var schedules: [[Int32]?]
    /// Per frontend (in the table's order), `balance source`: its hash ring over the candidates.
    private(set) var rings: [HashRing?]

    /// Its arrays, for the engine's next table by changes to change in place rather than copy
    /// (a thousand frontends): moved out when `table` is the only reference (the caller's), else
    /// copied. The caller drops the table afterwards.
    static func surrender(_ table: inout PublishedTable) -> (frontends: [Frontend], schedules: [[Int32]?], rings: [HashRing?]) {
        guard isKnownUniquelyReferenced(&table) else { return (table.table.frontends, table.schedules, table.rings) }
        defer {
            table.table.frontends = []
            table.schedules = []
            table.rings = []
        }
        return (table.table.frontends, table.schedules, table.rings)
    }

    /// `previousPositions`: for each frontend, its position in `previous` (the table published
    /// before), if it was there: its schedule or ring is reused when its backends and balance
    /// mode are the same.
    init(table: RoutingTable, cursors: [String: RoundRobinCursor], loads: [String: [String: BackendLoad]] = [:],
         previous: PublishedTable? = nil, previousPositions: [Int?] = []) {
        self.table = table
        self.cursors = cursors
        self.loads = loads
        var schedules: [[Int32]?] = []
        var rings: [HashRing?] = []
        schedules.reserveCapacity(table.frontends.count)
        rings.reserveCapacity(table.frontends.count)
        for (index, frontend) in table.frontends.enumerated() {
            let position = previous != nil && index < previousPositions.count ? previousPositions[index] : nil
            let plan = Self.plan(frontend, previous: position.map { previous!.plan(at: $0) })
            schedules.append(plan.schedule)
            rings.append(plan.ring)
        }
        self.schedules = schedules
        self.rings = rings
    }

    /// A table whose balancing plans are already made (`Engine.apply` with changes).
    init(table: RoutingTable, cursors: [String: RoundRobinCursor], loads: [String: [String: BackendLoad]],
         schedules: [[Int32]?], rings: [HashRing?]) {
        self.table = table
        self.cursors = cursors
        self.loads = loads
        self.schedules = schedules
        self.rings = rings
    }

    /// The frontend at `position` and its balancing plan.
    func plan(at position: Int) -> (frontend: Frontend, schedule: [Int32]?, ring: HashRing?) {
        (table.frontends[position], schedules[position], rings[position])
    }

    /// `frontend`'s balancing plan: that of `previous` (the same frontend as published before)
    /// when its backends and balance mode are the same, else made anew.
    static func plan(_ frontend: Frontend, previous: (frontend: Frontend, schedule: [Int32]?, ring: HashRing?)?)
        -> (schedule: [Int32]?, ring: HashRing?) {
        if let previous, previous.frontend.backends == frontend.backends,
           previous.frontend.settings.balance == frontend.settings.balance {
            return (previous.schedule, previous.ring)
        }
        let candidates = frontend.backends.filter(Self.isCandidate)
        switch frontend.settings.balance {
        case .roundRobin:
            return (WeightedSchedule.make(candidates.map(\.effectiveWeight)), nil)
        case .source:
            return (nil, HashRing(names: candidates.map(\.name), weights: candidates.map(\.effectiveWeight)))
        case .leastConn:
            return (nil, nil)
        }
    }

    /// Whether new connections may go to `backend`: enabled, weight above 0. Workers filter
    /// their candidates with it too, so the schedule's indices match theirs.
    static func isCandidate(_ backend: Backend) -> Bool {
        backend.enabled && backend.weight > 0
    }
}

/// The part of a worker other threads may touch: its mailbox, its wake-up eventfd, its counters.
final class WorkerHandle: Sendable {
    let index: Int
    let wakeup: WakeupSignal
    let mailbox = Mutex<[WorkerCommand]>([])
    let registry = CounterRegistry()

    init(index: Int) throws(SystemError) {
        self.index = index
        wakeup = try WakeupSignal()
    }

    /// Queues a command and wakes the worker. Callable from any thread.
    func post(_ command: WorkerCommand) {
        mailbox.withLock { $0.append(command) }
        wakeup.wake()
    }
}

/// State shared by all workers of an engine.
final class EngineShared: Sendable {
    /// Client connections open across all workers (for `maxConnections`).
    let connections = Atomic<Int>(0)
    let connectionLog: ConnectionLog?

    init(connectionLog: ConnectionLog? = nil) {
        self.connectionLog = connectionLog
    }
}

/// A worker's token kinds (`EventToken`; kind 0 is the wake-up): a listener's slot is its index
/// in `listenerSlots`, a session's its slot in `sessions`.
/// One listening socket a worker polls, and its frontend.
struct ListenerSlot {
    let frontend: FrontendRuntime
    let fd: CInt
}

enum WorkerToken {
    static let listener: UInt64 = 1
    static let client: UInt64 = 2
    static let backend: UInt64 = 3
    /// What a session socket is registered for (edge-triggered, both directions, the peer's FIN).
    static let socketEvents = Epoll.readable | Epoll.writable | Epoll.readHangup | Epoll.edgeTriggered
}
