import BerthSystem
import Synchronization

/// What the control plane asks the data plane to serve: frontends (a listening address and a
/// name) and, for each, the backends to balance over. Plain values; `Engine.apply` publishes a
/// table to every worker. Pure: no sockets here.
public struct RoutingTable: Sendable, Equatable {
    /// The etcd revision (or any version number) this table was built from.
    public var revision: UInt64
    public var frontends: [Frontend]
    /// Tells this table from the others its producer made (`RoutingTable.makeSerial`); 0: not
    /// told. Not part of `==`.
    public var serial: UInt64 = 0
    /// What differs from the producer's table of serial `changes.base`: a layer that applied
    /// that table applies only these frontends and keeps the rest as they are (a fleet host sees
    /// every registry change, in tables of a thousand frontends). A producer that sets it keeps
    /// its tables in ascending order of frontend name, the base's too. nil: compare everything.
    /// Not part of `==`.
    public var changes: FrontendChanges?

    public init(revision: UInt64 = 0, frontends: [Frontend] = [], serial: UInt64 = 0, changes: FrontendChanges? = nil) {
        self.revision = revision
        self.frontends = frontends
        self.serial = serial
        self.changes = changes
    }

    public static func == (lhs: RoutingTable, rhs: RoutingTable) -> Bool {
        lhs.revision == rhs.revision && lhs.frontends == rhs.frontends
    }

    private static let serials = Atomic<UInt64>(0)

    /// A serial no other table of this process has.
    public static func makeSerial() -> UInt64 {
        serials.add(1, ordering: .relaxed).newValue
    }

    /// The names of the frontends added, removed or made anew between two frontend lists in
    /// ascending order of name (for `changes`): a merge, where a frontend kept from one table to
    /// the next compares by reference.
    public static func changedNames(from old: [Frontend], to new: [Frontend]) -> [String] {
        var names: [String] = []
        var i = 0, j = 0
        while i < old.count || j < new.count {
            if i < old.count && j < new.count && old[i].name == new[j].name {
                if old[i] != new[j] { names.append(new[j].name) }
                i += 1
                j += 1
            } else if j == new.count || (i < old.count && old[i].name < new[j].name) {
                names.append(old[i].name)
                i += 1
            } else {
                names.append(new[j].name)
                j += 1
            }
        }
        return names
    }

    /// Where the frontend named `name` is in `frontends`, or would be inserted; only for a
    /// table in ascending order of name.
    public func search(_ name: String) -> (index: Int, found: Bool) {
        frontends.searchByName(name) { $0.name }
    }

    /// Returns a description of the first inconsistency, or nil when the table can be served.
    public func validationError() -> String? {
        validationError(checking: { _ in true })
    }

    /// The same, with each frontend's own rules (`Frontend.validationError`) checked only where
    /// `checking` says so (the engine skips frontends it validated in an earlier table).
    func validationError(checking: (Frontend) -> Bool) -> String? {
        var names = Set<String>()
        var addresses = Set<SocketAddress>()
        names.reserveCapacity(frontends.count)
        for frontend in frontends {
            if frontend.name.isEmpty { return "a frontend has an empty name" }
            if !names.insert(frontend.name).inserted { return "frontend '\(frontend.name)' appears twice" }
            if frontend.listen.port != 0 && !addresses.insert(frontend.listen).inserted {
                return "two frontends listen on \(frontend.listen)"
            }
            if checking(frontend), let problem = frontend.validationError() { return problem }
        }
        return nil
    }
}

public struct Frontend: Sendable, Equatable {
    /// The fields, behind one reference (copy on write). A table's frontends are copied at
    /// every layer it passes (discovery, health, engine, each worker), and most of them are
    /// unchanged from the last table: a copy then costs one retain, and `==` between copies of
    /// one frontend is a pointer comparison. Mutated only when uniquely referenced.
    private final class Fields: @unchecked Sendable {
        var name: String
        var listen: SocketAddress
        var backends: [Backend]
        var settings: FrontendSettings

        init(name: String, listen: SocketAddress, backends: [Backend], settings: FrontendSettings) {
            self.name = name
            self.listen = listen
            self.backends = backends
            self.settings = settings
        }
    }

    private var fields: Fields

    public var name: String {
        get { fields.name }
        _modify {
            makeUnique()
            yield &fields.name
        }
    }
    /// Where to listen; port 0 picks a free port (see `ApplyResult.listening`).
    public var listen: SocketAddress {
        get { fields.listen }
        _modify {
            makeUnique()
            yield &fields.listen
        }
    }
    public var backends: [Backend] {
        get { fields.backends }
        _modify {
            makeUnique()
            yield &fields.backends
        }
    }
    public var settings: FrontendSettings {
        get { fields.settings }
        _modify {
            makeUnique()
            yield &fields.settings
        }
    }

    public init(name: String, listen: SocketAddress, backends: [Backend], settings: FrontendSettings = .init()) {
        fields = Fields(name: name, listen: listen, backends: backends, settings: settings)
    }

    private mutating func makeUnique() {
        if !isKnownUniquelyReferenced(&fields) {
            fields = Fields(name: fields.name, listen: fields.listen, backends: fields.backends, settings: fields.settings)
        }
    }

    public static func == (lhs: Frontend, rhs: Frontend) -> Bool {
        lhs.fields === rhs.fields
            || (lhs.name == rhs.name && lhs.listen == rhs.listen && lhs.backends == rhs.backends && lhs.settings == rhs.settings)
    }

    /// The frontend's own rules (unique backend names, weights, warmups, settings in range).
    func validationError() -> String? {
        var backendNames = Set<String>()
        backendNames.reserveCapacity(backends.count)
        for backend in backends where !backendNames.insert(backend.name).inserted {
            return "frontend '\(name)' has backend '\(backend.name)' twice"
        }
        if settings.retries < 0 { return "frontend '\(name)': retries must be >= 0" }
        if let bad = backends.first(where: { !(0...256).contains($0.weight) }) {
            return "frontend '\(name)': backend '\(bad.name)' has weight \(bad.weight) (0 to 256)"
        }
        if let bad = backends.first(where: { !(1...Backend.fullWarmup).contains($0.warmup) }) {
            return "frontend '\(name)': backend '\(bad.name)' has warmup \(bad.warmup) (1 to \(Backend.fullWarmup))"
        }
        if settings.slowStart < 0 { return "frontend '\(name)': slow start must be >= 0" }
        return nil
    }
}

public struct Backend: Sendable, Hashable {
    /// Unique within its frontend (an instance id, or the address as text).
    public var name: String
    public var address: SocketAddress
    /// Takes new connections. A disabled backend (down, or drained by an operator) keeps its
    /// open connections with no deadline, unlike one removed from the table, which drains.
    public var enabled: Bool
    /// Share of new connections relative to the frontend's other backends (0...256, HAProxy's
    /// range). 0 takes no new connection; its open ones run on.
    public var weight: Int
    /// Slow start: the part of `weight` in force now, in thousandths (`fullWarmup`: all of it).
    /// The health layer raises it step by step after the backend comes up.
    public var warmup: Int = Backend.fullWarmup

    public static let fullWarmup = 1_000

    public init(name: String, address: SocketAddress, enabled: Bool = true, weight: Int = 1) {
        self.name = name
        self.address = address
        self.enabled = enabled
        self.weight = weight
    }

    /// The weight balancing uses: `weight` scaled by `warmup` (thousandths of it; only ratios
    /// between backends matter, so a weight-1 backend can ramp in fine steps too).
    @inline(__always)
    public var effectiveWeight: Int { weight * warmup }

    public init(_ address: SocketAddress) {
        self.init(name: address.description, address: address)
    }
}

/// Per-frontend behaviour; times in milliseconds. Defaults follow common HAProxy setups.
public struct FrontendSettings: Sendable, Equatable {
    /// Further backends tried after a failed connect (HAProxy's `retries`).
    public var retries: Int = 3
    public var connectTimeout: Int64 = 5_000
    /// A connection closes when its client side has moved no byte for this long (0: never).
    public var clientTimeout: Int64 = 60_000
    /// ... or its backend side has moved no byte for this long (0: never).
    public var serverTimeout: Int64 = 60_000
    /// Keep the client's first bytes (up to `replayLimit`) until the backend's first byte; a
    /// backend that closes or resets before answering is replaced and the bytes replayed. Only
    /// for protocols whose first request is safe to repeat (see docs/OPERATIONS.md).
    public var retryOnEmptyResponse = false
    /// Keep the client's first bytes the same way; a backend that has sent nothing
    /// `firstByteTimeout` ms after the client's first byte reached it is abandoned and the bytes
    /// replayed to the next backend (HAProxy's `retry-on response-timeout`, Envoy's per-try
    /// timeout). The timer starts with the client's first byte: a client that has said nothing
    /// yet is not waiting for an answer.
    public var retryOnResponseTimeout = false
    public var firstByteTimeout: Int64 = 2_000
    public var replayLimit = 16 * 1024
    /// How a new connection picks its backend.
    public var balance: BalanceMode = .roundRobin
    /// A backend that comes up (added to a running frontend, or back from down or maintenance)
    /// ramps from a small share to its full weight over this many ms (HAProxy's `slowstart`;
    /// 0: at once). The engine does not read it: the health layer sets `Backend.warmup`.
    public var slowStart: Int64 = 0
    /// Write a PROXY protocol header to the backend before the client's first byte (nil: none).
    public var sendProxy: ProxyProtocolVersion?
    /// One log record per closed connection (HAProxy's `option tcplog`).
    public var logConnections = false
    /// Set by the health layer when every backend is down and they are all used anyway
    /// (`--all-down try-all`): new sessions are counted as `panicSessions`.
    public var panic = false

    public init(retries: Int = 3, connectTimeout: Int64 = 5_000, clientTimeout: Int64 = 60_000,
                serverTimeout: Int64 = 60_000, retryOnEmptyResponse: Bool = false,
                retryOnResponseTimeout: Bool = false, firstByteTimeout: Int64 = 2_000) {
        self.retries = retries
        self.connectTimeout = connectTimeout
        self.clientTimeout = clientTimeout
        self.serverTimeout = serverTimeout
        self.retryOnEmptyResponse = retryOnEmptyResponse
        self.retryOnResponseTimeout = retryOnResponseTimeout
        self.firstByteTimeout = firstByteTimeout
    }

    /// The client's first bytes are kept for a replay (either retry kind).
    public var keepsReplay: Bool { retryOnEmptyResponse || retryOnResponseTimeout }
}

/// How a frontend picks a backend for a new connection (HAProxy's `balance`).
public enum BalanceMode: String, Sendable, CaseIterable {
    /// Smooth weighted round-robin, one rotation across all workers.
    case roundRobin = "roundrobin"
    /// The backend with the fewest open connections over all workers, relative to its weight.
    case leastConn = "leastconn"
    /// A consistent hash of the client's address: a client keeps its backend while it is up.
    case source
}

/// The PROXY protocol version written to backends (HAProxy's `send-proxy`, `send-proxy-v2`).
public enum ProxyProtocolVersion: String, Sendable, CaseIterable {
    case v1
    case v2
}

/// The frontends of a table that differ from an earlier one (`RoutingTable.changes`).
public struct FrontendChanges: Sendable, Equatable {
    /// The serial of the table these are relative to.
    public var base: UInt64
    /// Names of the frontends added, removed or given anew since it: ascending, each once. A
    /// name given anew may turn out equal to what the layer holds; it is then kept.
    public var names: [String]

    public init(base: UInt64, names: [String]) {
        self.base = base
        self.names = names
    }
}

extension Array {
    /// Binary search over elements in ascending order of `name`: the position of `target`, or
    /// where it would be inserted.
    @inlinable
    public func searchByName(_ target: String, _ name: (Element) -> String) -> (index: Int, found: Bool) {
        var low = 0, high = count
        while low < high {
            let middle = (low + high) / 2
            if name(self[middle]) < target { low = middle + 1 } else { high = middle }
        }
        return (low, low < count && name(self[low]) == target)
    }
}
