import Synchronization

/// The traffic counters of every frontend and backend row, defined once (HAProxy drives all its
/// stats outputs from one table of fields the same way). Everything that lists counters iterates
/// `TrafficCounter.all`: the snapshot a worker's atomics are read into and its sum over workers
/// (`TrafficSnapshot`), and in BerthStats the JSON (`name`), HAProxy's CSV (`csvColumn`),
/// Prometheus (`metric`, `help`) and the HTML page (`html`).
///
/// Adding a counter: its `Atomic` in `TrafficCounters` (and the increment where the event
/// happens), one `static let` here whose `index` is the next number, and that row at the end of
/// `all` (CounterTableTests checks the two agree). Every row is a Prometheus counter (`_total`).
/// Not in the table: the gauges (sessions open now, the highest, the last session's time) and the
/// session rates, which the renderers place around these, and the health-check columns (BerthHealth).
public struct TrafficCounter: Sendable, Hashable, CustomStringConvertible {
    /// Position in `all` and in a snapshot's `counts`.
    public let index: Int
    /// The JSON key (`/stats.json`), and how code names it (`snapshot.connectErrors`).
    public let name: String
    /// Prometheus name after `berth_frontend_` / `berth_backend_`; nil: not exported.
    public let metric: String?
    /// Prometheus help; `{what}` becomes "clients of the service" or "the backend".
    public let help: String
    /// HAProxy's CSV column (`show stat`); nil: no HAProxy column means this.
    public let csvColumn: String?
    /// Filled on FRONTEND rows too (HAProxy leaves connection errors and retries empty there).
    public let csvOnFrontend: Bool
    /// The HTML page's column group and title; nil: not on the page.
    public let html: (group: String, title: String)?
    /// Reads a worker's copy (the worker alone writes it).
    let load: @Sendable (TrafficCounters) -> UInt64

    public static let totalSessions = TrafficCounter(
        0, "totalSessions", metric: "sessions_total", help: "Sessions started with {what}.",
        csv: "stot", csvOnFrontend: true, html: ("Sessions", "Total")) { $0.totalSessions.load(ordering: .relaxed) }
    public static let bytesIn = TrafficCounter(
        1, "bytesIn", metric: "bytes_in_total", help: "Bytes received from clients, through {what}.",
        csv: "bin", csvOnFrontend: true, html: ("Bytes", "In")) { $0.bytesIn.load(ordering: .relaxed) }
    public static let bytesOut = TrafficCounter(
        2, "bytesOut", metric: "bytes_out_total", help: "Bytes sent to clients, through {what}.",
        csv: "bout", csvOnFrontend: true, html: ("Bytes", "Out")) { $0.bytesOut.load(ordering: .relaxed) }
    public static let connectErrors = TrafficCounter(
        3, "connectErrors", metric: "connect_errors_total", help: "Failed connects to {what}.",
        csv: "econ", html: ("Errors", "Conn")) { $0.connectErrors.load(ordering: .relaxed) }
    public static let retries = TrafficCounter(
        4, "retries", metric: "retries_total", help: "Connects retried after failing on {what}.",
        csv: "wretr", html: ("Errors", "Retr")) { $0.retries.load(ordering: .relaxed) }
    public static let redispatches = TrafficCounter(
        5, "redispatches", metric: "redispatches_total",
        help: "Sessions moved elsewhere after an empty response or a response timeout (--retry-on), {what}.",
        csv: "wredis", html: ("Errors", "Redis")) { $0.redispatches.load(ordering: .relaxed) }
    /// Clients closed because no backend could be connected.
    public static let failedSessions = TrafficCounter(
        6, "failedSessions", metric: "failed_sessions_total",
        help: "Clients closed because no backend could be connected, {what}.",
        html: ("Errors", "Failed")) { $0.failedSessions.load(ordering: .relaxed) }
    public static let timeouts = TrafficCounter(
        7, "timeouts", metric: "timeouts_total", help: "Sessions closed by a timeout, {what}.") {
        $0.timeouts.load(ordering: .relaxed)
    }
    /// Sessions routed while every backend was down (`--all-down try-all`).
    public static let panicSessions = TrafficCounter(
        8, "panicSessions", metric: "panic_sessions_total",
        help: "Sessions routed while every backend was down (--all-down try-all), {what}.") {
        $0.panicSessions.load(ordering: .relaxed)
    }

    /// Every counter, in `index` order (the order of the CSV's, the metrics' and the page's columns).
    public static let all: [TrafficCounter] = [
        totalSessions, bytesIn, bytesOut, connectErrors, retries, redispatches, failedSessions, timeouts, panicSessions,
    ]

    private init(_ index: Int, _ name: String, metric: String?, help: String, csv: String? = nil,
                 csvOnFrontend: Bool = false, html: (group: String, title: String)? = nil,
                 load: @escaping @Sendable (TrafficCounters) -> UInt64) {
        self.index = index
        self.name = name
        self.metric = metric
        self.help = help
        csvColumn = csv
        self.csvOnFrontend = csvOnFrontend
        self.html = html
        self.load = load
    }

    public var description: String { name }

    public static func == (lhs: TrafficCounter, rhs: TrafficCounter) -> Bool { lhs.index == rhs.index }

    public func hash(into hasher: inout Hasher) { hasher.combine(index) }
}

/// Counter values in `TrafficCounter.all` order, read by name: `values.connectErrors`, or
/// `values[.connectErrors]`, or by iterating the table.
@dynamicMemberLookup
public struct TrafficCounts: Sendable, Equatable {
    /// One per row of the table, at its `index`.
    public private(set) var values = [UInt64](repeating: 0, count: TrafficCounter.all.count)

    public init() {}

    public subscript(_ counter: TrafficCounter) -> UInt64 {
        get { values[counter.index] }
        set { values[counter.index] = newValue }
    }

    public subscript(dynamicMember member: KeyPath<TrafficCounter.Type, TrafficCounter>) -> UInt64 {
        get { self[TrafficCounter.self[keyPath: member]] }
        set { self[TrafficCounter.self[keyPath: member]] = newValue }
    }

    /// Adds every counter of `other` (wrapping, as the counters themselves do).
    public mutating func add(_ other: TrafficCounts) {
        for index in values.indices { values[index] &+= other.values[index] }
    }
}
