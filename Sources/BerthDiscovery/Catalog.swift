import BerthRegistry
import BerthSystem

/// What etcd says, as services and their instances: the registry's keys and values folded in
/// revision order. A plain value with no threads and no I/O; the watch loop owns one and calls
/// `reset` (initial Range, re-list after compaction) and `apply` (each watch event), then
/// `routingTable` (CatalogRouting.swift) to get the table to publish.
///
/// Malformed keys and values are never fatal: they are skipped, counted in `malformed`, and the
/// key's previous meaning (a good instance, port or config) is dropped, since the key's current
/// value is what counts.
public struct Catalog: Sendable {
    public struct Options: Sendable, Equatable {
        public var layout: RegistryLayout
        /// Listen port of services that get one from nowhere else (registrator's layout).
        public var defaultListen: UInt16?
        /// How long a service whose last instance left keeps its frontend (ms); `_config`'s
        /// `linger` overrides it per service.
        public var linger: Int64
        /// How many malformed keys are kept for the stats page and the log.
        public var malformedHistory: Int
        /// Only these services (`--services`; nil: all). Their keys come from one watch each
        /// (`watchRanges`), and the others' keys are ignored.
        public var services: Set<String>?

        public init(layout: RegistryLayout = RegistryLayout(), defaultListen: UInt16? = nil,
                    linger: Int64 = 30_000, malformedHistory: Int = 64, services: Set<String>? = nil) {
            self.layout = layout
            self.defaultListen = defaultListen
            self.linger = linger
            self.malformedHistory = malformedHistory
            self.services = services
        }

        /// The key prefixes to list and watch: the whole registry, or with `services` each
        /// service's prefix and the `_config` prefix (sorted).
        public var watchRanges: [String] {
            guard let services else { return [layout.watchPrefix] }
            return (services.map(layout.servicePrefix) + [layout.configPrefix]).sorted()
        }
    }

    /// What the registry holds for one service.
    public struct Service: Sendable, Equatable {
        /// Instance id → record.
        public var instances: [String: InstanceRecord] = [:]
        /// The seed's `<prefix>/<service>/port`.
        public var seedPort: UInt16?
        public var config: ServiceConfig?

        public init(instances: [String: InstanceRecord] = [:], seedPort: UInt16? = nil, config: ServiceConfig? = nil) {
            self.instances = instances
            self.seedPort = seedPort
            self.config = config
        }

        var isEmpty: Bool { instances.isEmpty && seedPort == nil && config == nil }
    }

    public let options: Options
    /// The etcd revision every applied event and the last reset are at or below.
    public private(set) var revision: Int64 = 0
    /// Services by decoded name.
    public private(set) var services: [String: Service] = [:]
    public private(set) var malformed: MalformedLog
    /// Keys whose current value is malformed, with the reason: cleared when the key is
    /// deleted or gets a good value.
    public private(set) var malformedKeys: [String: MalformedReason] = [:]

    /// The revision order of each watched range (one range, the whole prefix, unless
    /// `Options.services`: one watch stream per range, and etcd orders events within a watch
    /// only, so each range is replayed and deduplicated on its own).
    private var orders: [String: RevisionOrder] = [:]
    /// The revision of the last `reset` (where every range's order starts).
    private var listedRevision: Int64 = 0
    /// Routing memory between builds (listen ports served, when a service became empty, each
    /// service's frontend as last built).
    var routingMemory = RoutingMemory()
    /// Services whose keys changed since the last `routingTable` (only they are built again);
    /// nil: every service (at first, and after a `reset`).
    var changedServices: Set<String>? = nil

    public init(options: Options = Options()) {
        self.options = options
        self.malformed = MalformedLog(capacity: options.malformedHistory)
    }

    // MARK: Events

    /// Replaces everything with a full listing at `revision` (the initial Range, or a re-list
    /// after the watch was compacted). Returns which instances appeared, changed and
    /// disappeared, so that none of the old ones survives unnoticed.
    @discardableResult
    public mutating func reset(entries: [(key: String, value: [UInt8])], revision: Int64) -> CatalogDiff {
        let before = services
        services = [:]
        changedServices = nil
        malformedKeys = [:]
        for entry in entries {
            _ = store(key: entry.key, value: entry.value, revision: revision)
        }
        self.revision = revision
        listedRevision = revision
        orders = [:]
        return CatalogDiff(before: before, after: services)
    }

    /// Applies a put. Events older than the applied revision, and repeats of one already
    /// applied at the same revision, are ignored (`.stale`): a watch resumed from an earlier
    /// revision replays harmlessly. Events of one revision (a transaction) all apply.
    @discardableResult
    public mutating func apply(put key: String, value: [UInt8], revision: Int64) -> EventOutcome {
        guard admit(key: key, revision: revision) else { return .stale }
        return store(key: key, value: value, revision: revision)
    }

    /// Applies a delete; same revision rule as `apply(put:)`.
    @discardableResult
    public mutating func apply(delete key: String, revision: Int64) -> EventOutcome {
        guard admit(key: key, revision: revision) else { return .stale }
        return remove(key: key)
    }

    /// Whether `key` is an instance of the catalog now.
    public func holdsInstance(_ key: String) -> Bool {
        guard case .instance(let service, let instance) = options.layout.classify(key) else { return false }
        return services[service]?.instances[instance] != nil
    }

    /// Removes what `key` means, outside the revision order: a delete the watch loop held back
    /// (see `DiscoverySettings.outageHold`) and whose key was not put again since.
    @discardableResult
    public mutating func remove(key: String) -> EventOutcome {
        malformedKeys.removeValue(forKey: key)
        let kind = options.layout.classify(key)
        if let wanted = options.services, let service = kind.service, !wanted.contains(service) { return .ignored(.otherService) }
        switch kind {
        case .ignored(let reason):
            return .ignored(reason)
        case .malformed:
            return .unchanged
        case .instance(let service, let instance):
            let removed = services[service]?.instances.removeValue(forKey: instance) != nil
            dropIfEmpty(service)
            return removed ? changed(service) : .unchanged
        case .port(let service):
            let removed = services[service]?.seedPort != nil
            services[service]?.seedPort = nil
            dropIfEmpty(service)
            return removed ? changed(service) : .unchanged
        case .config(let service):
            let removed = services[service]?.config != nil
            services[service]?.config = nil
            dropIfEmpty(service)
            return removed ? changed(service) : .unchanged
        }
    }

    /// One event of a watch response.
    public enum Event: Sendable, Equatable {
        case put(key: String, value: [UInt8], revision: Int64)
        case delete(key: String, revision: Int64)
    }

    /// Applies events in order; true when any of them changed the catalog.
    @discardableResult
    public mutating func apply(_ events: [Event]) -> Bool {
        var changed = false
        for event in events {
            let outcome: EventOutcome
            switch event {
            case .put(let key, let value, let revision): outcome = apply(put: key, value: value, revision: revision)
            case .delete(let key, let revision): outcome = apply(delete: key, revision: revision)
            }
            changed = changed || outcome.changesCatalog
        }
        return changed
    }

    private mutating func admit(key: String, revision: Int64) -> Bool {
        let range = range(of: key)
        var order = orders[range] ?? RevisionOrder(revision: listedRevision)
        defer { orders[range] = order }
        guard order.admit(key: key, revision: revision) else { return false }
        self.revision = max(self.revision, revision)
        return true
    }

    /// The watched range `key` came from.
    private func range(of key: String) -> String {
        guard options.services != nil else { return "" }
        let rest = key.utf8.dropFirst(options.layout.watchPrefix.utf8.count)
        guard let slash = rest.firstIndex(of: UInt8(ascii: "/")) else { return String(Substring(rest)) }
        return String(Substring(key.utf8[key.utf8.startIndex..<slash]))
    }

    /// Sets the key's meaning from its value, or drops it and counts the value as malformed.
    private mutating func store(key: String, value: [UInt8], revision: Int64) -> EventOutcome {
        let kind = options.layout.classify(key)
        if case .ignored(let reason) = kind { return .ignored(reason) }
        if let wanted = options.services, let service = kind.service, !wanted.contains(service) { return .ignored(.otherService) }
        if case .malformed(let error) = kind {
            return record(MalformedEntry(key: key, reason: .key(error.reason), detail: error.reason.rawValue, revision: revision),
                          removed: false)
        }
        do throws(ValueError) {
            let changed: Bool
            let name: String
            switch kind {
            case .instance(let service, let instance):
                let parsed = try InstanceRecord.parse(value)
                name = service
                changed = services[service, default: Service()].instances.updateValue(parsed, forKey: instance) != parsed
            case .port(let service):
                let port = try Self.parsePort(value)
                name = service
                changed = services[service]?.seedPort != port
                services[service, default: Service()].seedPort = port
            case .config(let service):
                let config = try ServiceConfig.parse(value)
                name = service
                changed = services[service]?.config != config
                services[service, default: Service()].config = config
            case .ignored, .malformed:
                return .unchanged
            }
            malformedKeys.removeValue(forKey: key)
            return changed ? self.changed(name) : .unchanged
        } catch {
            let removed = forget(kind)
            return record(MalformedEntry(key: key, reason: .value(error.reason), detail: error.detail, revision: revision),
                          removed: removed)
        }
    }

    /// Drops what a key meant; true when it meant something.
    private mutating func forget(_ kind: KeyClass) -> Bool {
        let removed: Bool
        let name: String
        switch kind {
        case .instance(let service, let instance):
            name = service
            removed = services[service]?.instances.removeValue(forKey: instance) != nil
        case .port(let service):
            name = service
            removed = services[service]?.seedPort != nil
            services[service]?.seedPort = nil
        case .config(let service):
            name = service
            removed = services[service]?.config != nil
            services[service]?.config = nil
        case .ignored, .malformed:
            return false
        }
        dropIfEmpty(name)
        if removed { _ = changed(name) }
        return removed
    }

    private mutating func record(_ entry: MalformedEntry, removed: Bool) -> EventOutcome {
        malformed.add(entry)
        malformedKeys[entry.key] = entry.reason
        return .malformed(entry, removedPrevious: removed)
    }

    /// Notes that `service` changed (its frontend is built again); returns `.changed`.
    private mutating func changed(_ service: String) -> EventOutcome {
        changedServices?.insert(service)
        return .changed
    }

    private mutating func dropIfEmpty(_ service: String) {
        if services[service]?.isEmpty == true { services.removeValue(forKey: service) }
    }

    /// The seed's port value: digits (white space trimmed), 1...65535.
    static func parsePort(_ bytes: [UInt8]) throws(ValueError) -> UInt16 {
        guard bytes.count <= 64, let text = String(validating: bytes, as: UTF8.self) else {
            throw ValueError(.badPort, "the port value must be a number from 1 to 65535")
        }
        let trimmed = InstanceRecord.trimWhiteSpace(text)
        guard !trimmed.isEmpty, trimmed.allSatisfy({ $0.isASCII && $0.isNumber }),
              let port = UInt16(trimmed), port >= 1 else {
            throw ValueError(trimmed.isEmpty ? .empty : .badPort, "port '\(trimmed.prefix(20))' is not a number from 1 to 65535")
        }
        return port
    }

    // MARK: Keys as etcd returns them (bytes)

    /// `reset` with keys as bytes; a key that is not UTF-8 is counted as malformed.
    @discardableResult
    public mutating func reset(byteEntries entries: [(key: [UInt8], value: [UInt8])], revision: Int64) -> CatalogDiff {
        var texts: [(key: String, value: [UInt8])] = []
        var invalid: [[UInt8]] = []
        for entry in entries {
            if let key = String(validating: entry.key, as: UTF8.self) { texts.append((key, entry.value)) } else { invalid.append(entry.key) }
        }
        let diff = reset(entries: texts, revision: revision)
        for key in invalid { _ = recordInvalidKey(key, revision: revision) }
        return diff
    }

    @discardableResult
    public mutating func apply(put key: [UInt8], value: [UInt8], revision: Int64) -> EventOutcome {
        if let text = String(validating: key, as: UTF8.self) { return apply(put: text, value: value, revision: revision) }
        guard admit(key: String(decoding: key, as: UTF8.self), revision: revision) else { return .stale }
        return recordInvalidKey(key, revision: revision)
    }

    @discardableResult
    public mutating func apply(delete key: [UInt8], revision: Int64) -> EventOutcome {
        if let text = String(validating: key, as: UTF8.self) { return apply(delete: text, revision: revision) }
        guard admit(key: String(decoding: key, as: UTF8.self), revision: revision) else { return .stale }
        return .unchanged
    }

    private mutating func recordInvalidKey(_ key: [UInt8], revision: Int64) -> EventOutcome {
        guard case .malformed(let error) = options.layout.classify(key) else { return .ignored(.outsidePrefix) }
        return record(MalformedEntry(key: error.key, reason: .key(error.reason), detail: error.reason.rawValue, revision: revision),
                      removed: false)
    }

    // MARK: Queries

    /// Figures for the stats page and the log.
    public var statistics: CatalogStatistics {
        CatalogStatistics(revision: revision, services: services.count, instances: instanceCount,
                          malformedTotal: malformed.total, malformedByReason: malformed.byReason,
                          malformedNow: malformedKeys.count, recentMalformed: malformed.recent)
    }

    /// Instances in all services.
    public var instanceCount: Int { services.values.reduce(0) { $0 + $1.instances.count } }

    /// Host names (not IP addresses) of every instance: what `HostResolver.track` should follow.
    public var hostNames: Set<String> {
        var names = Set<String>()
        for service in services.values {
            for instance in service.instances.values where instance.hostKind == .name && instance.host != "localhost" {
                names.insert(instance.host)
            }
        }
        return names
    }
}

/// A snapshot of the catalog's figures (`Catalog.statistics`).
public struct CatalogStatistics: Sendable, Equatable {
    /// The applied etcd revision.
    public var revision: Int64
    public var services: Int
    public var instances: Int
    /// Malformed keys and values seen since start (puts and listings), and per reason.
    public var malformedTotal: UInt64
    public var malformedByReason: [MalformedReason: UInt64]
    /// Keys whose current value is malformed.
    public var malformedNow: Int
    /// The last few, oldest first (bounded by `Options.malformedHistory`).
    public var recentMalformed: [MalformedEntry]
}

/// What one event did.
public enum EventOutcome: Sendable, Equatable {
    /// The catalog changed: rebuild the routing table.
    case changed
    /// Applied, but the key's meaning is as it was (same value again, delete of an unknown key).
    case unchanged
    /// Older than the applied revision, or a repeat at the same revision: ignored.
    case stale
    /// Not a key of the layout (outside the prefix, a reserved name): ignored, not counted.
    case ignored(IgnoredReason)
    /// Skipped and counted; `removedPrevious` when the key held a good value until now.
    case malformed(MalformedEntry, removedPrevious: Bool)

    public var changesCatalog: Bool {
        switch self {
        case .changed: true
        case .malformed(_, let removed): removed
        case .unchanged, .stale, .ignored: false
        }
    }
}

/// One instance, by service and id.
public struct InstanceID: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var service: String
    public var instance: String

    public init(service: String, instance: String) {
        self.service = service
        self.instance = instance
    }

    public static func < (lhs: InstanceID, rhs: InstanceID) -> Bool {
        (lhs.service, lhs.instance) < (rhs.service, rhs.instance)
    }

    public var description: String { "\(service)/\(instance)" }
}

/// The instances a reset added, changed and removed; each list sorted.
public struct CatalogDiff: Sendable, Equatable {
    public var added: [InstanceID] = []
    public var changed: [InstanceID] = []
    public var removed: [InstanceID] = []
    /// Service settings or seed ports that differ.
    public var servicesReconfigured: [String] = []

    public var isEmpty: Bool { added.isEmpty && changed.isEmpty && removed.isEmpty && servicesReconfigured.isEmpty }

    init(before: [String: Catalog.Service], after: [String: Catalog.Service]) {
        for name in Set(before.keys).union(after.keys).sorted() {
            let old = before[name] ?? Catalog.Service()
            let new = after[name] ?? Catalog.Service()
            for instance in Set(old.instances.keys).union(new.instances.keys).sorted() {
                let id = InstanceID(service: name, instance: instance)
                switch (old.instances[instance], new.instances[instance]) {
                case (nil, .some): added.append(id)
                case (.some, nil): removed.append(id)
                case (.some(let a), .some(let b)) where a != b: changed.append(id)
                default: break
                }
            }
            if old.seedPort != new.seedPort || old.config != new.config { servicesReconfigured.append(name) }
        }
    }
}

/// Revision order within one watched range: events older than the last applied, and repeats of
/// one applied at the same revision, are replays. Events of one revision (a transaction) all
/// apply.
struct RevisionOrder: Sendable {
    var revision: Int64
    /// Every event of `revision` is already reflected (after a listing at it).
    var complete = true
    /// Keys applied at `revision`.
    var keys: Set<String> = []

    init(revision: Int64) {
        self.revision = revision
    }

    mutating func admit(key: String, revision: Int64) -> Bool {
        if revision > self.revision {
            self.revision = revision
            complete = false
            keys = [key]
            return true
        }
        return revision == self.revision && !complete && keys.insert(key).inserted
    }
}

extension KeyClass {
    /// The service a key belongs to (nil: ignored or malformed).
    var service: String? {
        switch self {
        case .instance(let service, _), .port(let service), .config(let service): service
        case .ignored, .malformed: nil
        }
    }
}
