import BerthEngine
import BerthHealth

// What the stats server shows: plain Sendable values, built once per request by
// `StatsCollector` and rendered by the HTML, CSV, JSON and Prometheus renderers. The JSON page
// is these values encoded as they are, so their field names are a public format: add fields,
// do not rename them.

/// Everything one page shows, at one instant.
public struct StatsSnapshot: Sendable, Codable, Equatable {
    public var process: ProcessView
    /// nil when this process runs no discovery (`berth proxy`).
    public var discovery: DiscoveryView?
    /// nil when this process registers nothing.
    public var registrar: RegistrarView?
    public var services: [ServiceStats]
}

/// The process itself.
public struct ProcessView: Sendable, Codable, Equatable {
    public var version: String
    public var pid: Int32
    public var uptimeSeconds: Double
    /// Data-plane worker threads.
    public var workers: Int
    /// Open client connections over all workers.
    public var openConnections: Int
    /// Revision of the routing table the engine serves.
    public var tableRevision: UInt64
    /// Admin API enabled (`--stats-auth` given).
    public var adminEnabled: Bool
    /// The connection log's records written and dropped (a worker's ring was full while the
    /// writer fell behind); nil without a connection log.
    public var connectionLogWritten: UInt64?
    public var connectionLogDropped: UInt64?
}

/// Discovery's state, as discovery reports it through `StatsProvider.discovery`.
public struct DiscoveryView: Sendable, Codable, Equatable {
    /// The etcd endpoint in use (e.g. `http://127.0.0.1:2379`).
    public var endpoint: String
    /// The watch is established now.
    public var connected: Bool
    /// The etcd revision of the last table applied.
    public var appliedRevision: Int64
    /// Seconds since the last watch event (nil: none yet).
    public var secondsSinceLastEvent: Double?
    /// Values under the prefix that did not parse (skipped, counted, logged).
    public var skippedValues: UInt64
    /// Where the table served comes from: "etcd", "state file" (etcd unreachable since start,
    /// `--state-file`), or "none" (neither yet).
    public var source: String?
    /// With `--state-file`: its path, the writes done and those that failed.
    public var stateFile: String?
    public var stateFileWrites: UInt64?
    public var stateFileFailures: UInt64?

    public init(endpoint: String, connected: Bool, appliedRevision: Int64,
                secondsSinceLastEvent: Double? = nil, skippedValues: UInt64 = 0) {
        self.endpoint = endpoint
        self.connected = connected
        self.appliedRevision = appliedRevision
        self.secondsSinceLastEvent = secondsSinceLastEvent
        self.skippedValues = skippedValues
    }
}

/// The registrar's state, as it reports it through `StatsProvider.registrar`.
public struct RegistrarView: Sendable, Codable, Equatable {
    /// Containers (or static entries) whose keys are in etcd now.
    public var registeredContainers: Int
    /// The etcd lease the keys are attached to (nil: none granted yet).
    public var leaseID: Int64?
    public var leaseTTLSeconds: Int?
    /// Seconds since the lease was last kept alive.
    public var secondsSinceKeepAlive: Double?
    /// The Docker event stream is connected.
    public var dockerConnected: Bool

    public init(registeredContainers: Int, leaseID: Int64? = nil, leaseTTLSeconds: Int? = nil,
                secondsSinceKeepAlive: Double? = nil, dockerConnected: Bool = false) {
        self.registeredContainers = registeredContainers
        self.leaseID = leaseID
        self.leaseTTLSeconds = leaseTTLSeconds
        self.secondsSinceKeepAlive = secondsSinceKeepAlive
        self.dockerConnected = dockerConnected
    }
}

/// One service: its frontend (the listener), its backends, and the sum over its backends.
public struct ServiceStats: Sendable, Codable, Equatable {
    public var name: String
    public var listen: String
    public var frontend: TrafficStats
    public var backends: [BackendStats]
    /// The BACKEND row: sums over `backends`; `maxSessions` is the highest backend's.
    public var totals: TrafficStats
    /// "UP" when some backend takes traffic, else "DOWN".
    public var status: String
    /// Times every backend was down at once.
    public var allDownEvents: UInt64
}

/// Counters of one row: the gauges and rates here, the counters in `counts` (the engine's table,
/// `TrafficCounter.all`), readable by name (`traffic.connectErrors`). In JSON every counter is a
/// key of the row, named by the table.
@dynamicMemberLookup
public struct TrafficStats: Sendable, Codable, Equatable {
    public var currentSessions = 0
    public var maxSessions = 0
    /// New sessions per second over the last second sampled.
    public var sessionRate = 0.0
    /// Highest `sessionRate` seen since start.
    public var sessionRateMax = 0.0
    /// Seconds since the last session started (nil: none yet).
    public var lastSessionSeconds: Double?
    public var counts = TrafficCounts()

    public init() {}

    public subscript(dynamicMember member: KeyPath<TrafficCounter.Type, TrafficCounter>) -> UInt64 {
        get { counts[TrafficCounter.self[keyPath: member]] }
        set { counts[TrafficCounter.self[keyPath: member]] = newValue }
    }

    private struct Key: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(_ name: String) { stringValue = name }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: Key.self)
        currentSessions = try container.decode(Int.self, forKey: Key("currentSessions"))
        maxSessions = try container.decode(Int.self, forKey: Key("maxSessions"))
        sessionRate = try container.decode(Double.self, forKey: Key("sessionRate"))
        sessionRateMax = try container.decode(Double.self, forKey: Key("sessionRateMax"))
        lastSessionSeconds = try container.decodeIfPresent(Double.self, forKey: Key("lastSessionSeconds"))
        for counter in TrafficCounter.all {
            counts[counter] = try container.decodeIfPresent(UInt64.self, forKey: Key(counter.name)) ?? 0
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: Key.self)
        try container.encode(currentSessions, forKey: Key("currentSessions"))
        try container.encode(maxSessions, forKey: Key("maxSessions"))
        try container.encode(sessionRate, forKey: Key("sessionRate"))
        try container.encode(sessionRateMax, forKey: Key("sessionRateMax"))
        try container.encodeIfPresent(lastSessionSeconds, forKey: Key("lastSessionSeconds"))
        for counter in TrafficCounter.all { try container.encode(counts[counter], forKey: Key(counter.name)) }
    }
}

/// The status column, HAProxy's words.
public enum BackendStatus: String, Sendable, Codable, Equatable {
    case up = "UP"
    case down = "DOWN"
    case drain = "DRAIN"
    case maint = "MAINT"
    case noCheck = "no check"

    /// Takes new connections.
    public var takesTraffic: Bool { self == .up || self == .noCheck }
}

/// One backend's row.
public struct BackendStats: Sendable, Codable, Equatable {
    public var name: String
    public var address: String
    public var status: BackendStatus
    public var adminState: AdminState
    /// Balancing weight in force: the operator's (`operatorWeight`) or the registry's.
    public var weight: Int
    /// true when an operator set `weight` (`berth ctl weight`, the admin API); nil otherwise.
    public var operatorWeight: Bool?
    /// Slow start: the percentage of `weight` in force while the backend ramps up; nil at full.
    public var warmupPercent: Int?
    /// nil without active checks (or in maintenance, whose checks pause).
    public var check: CheckStats?
    public var traffic: TrafficStats
}

extension BackendStats {
    /// The weight in force, marked when an operator set it or while it ramps up (slow start).
    public var weightText: String {
        var text = String(weight)
        if operatorWeight == true { text += " (set)" }
        if let warmupPercent { text += " (slow start \(warmupPercent)%)" }
        return text
    }
}

/// The last active check of a backend.
public struct CheckStats: Sendable, Codable, Equatable {
    /// `tcp`, `http:/path`, `tls`, `https:/path`.
    public var kind: String
    /// HAProxy's check_status code: L4OK, L4CON, L4TOUT, L6OK, L6RSP, L6TOUT, L7OK, L7STS, L7RSP, INI.
    public var code: String
    /// The HTTP status of http checks.
    public var httpStatus: Int?
    /// What the check saw ("HTTP 200", "connect: Connection refused").
    public var detail: String
    public var durationMilliseconds: Int64?
    /// Seconds since the status last changed.
    public var secondsSinceChange: Double
    public var rise: Int
    public var fall: Int
    public var consecutiveSuccesses: Int
    public var consecutiveFailures: Int
    public var checksDone: UInt64
    /// Times passive observation took it down.
    public var ejections: UInt64
}
