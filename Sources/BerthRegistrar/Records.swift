import BerthRegistry

/// What goes into etcd for a set of registrations: keys and values, pure.
///
/// Layout (docs/REGISTRY.md): `<prefix>/<service>/<instance>` holds Berth's JSON. With
/// `--compat seed` the value is the seed's `HOST:PORT` instead (Berth's discovery reads both),
/// and `<prefix>/<service>/port` holds the listen port, as the seed's docker-discover expects;
/// the seed has no draining, so a draining instance is simply left out in that mode.
public enum CompatMode: String, Sendable, CaseIterable {
    case none
    case seed
}

public struct RecordLayout: Sendable, Equatable {
    /// The discovery side's key schema: one escaping rule for both sides.
    public let registry: RegistryLayout
    public let compat: CompatMode

    public init(prefix: String = "/backends", compat: CompatMode = .none) {
        self.registry = RegistryLayout(prefix: prefix)
        self.compat = compat
    }

    public var prefix: String { registry.prefix }
    /// The prefix with its trailing slash: what to read back when checking etcd.
    public var readPrefix: String { registry.watchPrefix }

    /// nil for a name the schema refuses (empty, or the reserved instance id `port`).
    public func instanceKey(service: String, instance: String) -> String? {
        try? registry.instanceKey(service: service, instance: instance)
    }

    public func portKey(service: String) -> String { registry.portKey(service: service) }

    /// Every key this host should have, with its value. When two instances of one service
    /// disagree on the seed's `port` key, the first in key order wins.
    public func table(_ registrations: [Registration]) -> [String: String] {
        var result: [String: String] = [:]
        let ordered = registrations.sorted { ($0.service, $0.instance) < ($1.service, $1.instance) }
        for registration in ordered {
            guard let key = instanceKey(service: registration.service, instance: registration.instance) else { continue }
            switch compat {
            case .none:
                result[key] = encodeRecord(registration)
            case .seed:
                guard !registration.draining else { continue }
                result[key] = record(registration).encodedHostPort()
                let port = portKey(service: registration.service)
                if result[port] == nil { result[port] = String(registration.listen) }
            }
        }
        return result
    }
}

/// Berth's JSON value, in the discovery side's one encoding (`InstanceRecord.encodedJSON`:
/// fields in a fixed order, unset ones left out), so one registration always encodes to the
/// same text; the registrar compares texts to decide what to write.
public func encodeRecord(_ registration: Registration) -> String {
    record(registration).encodedJSON()
}

func record(_ registration: Registration) -> InstanceRecord {
    InstanceRecord(host: registration.host, port: UInt16(clamping: registration.port), listen: UInt16(clamping: registration.listen),
                   weight: registration.weight, tags: registration.tags, meta: registration.meta, draining: registration.draining)
}

/// The writes that take etcd from `written` to `desired`: puts of new or changed values and
/// deletes of keys no longer wanted, each sorted by key so runs are reproducible.
public struct RecordDiff: Sendable, Equatable {
    public var puts: [(key: String, value: String)]
    public var deletes: [String]

    public init(desired: [String: String], written: [String: String]) {
        puts = desired.filter { written[$0.key] != $0.value }.sorted { $0.key < $1.key }.map { (key: $0.key, value: $0.value) }
        deletes = written.keys.filter { desired[$0] == nil }.sorted()
    }

    public var isEmpty: Bool { puts.isEmpty && deletes.isEmpty }

    public static func == (left: RecordDiff, right: RecordDiff) -> Bool {
        left.deletes == right.deletes && left.puts.map(\.key) == right.puts.map(\.key) && left.puts.map(\.value) == right.puts.map(\.value)
    }
}
