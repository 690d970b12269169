/// What goes into etcd for a set of registrations: keys and values, pure.
///
/// Layout (DESIGN.md §2): `<prefix>/<service>/<instance>` holds Berth's JSON. With
/// `--compat seed` the value is the seed's `HOST:PORT` instead (Berth's discovery reads both),
/// and `<prefix>/<service>/port` holds the listen port, as the seed's docker-discover expects;
/// the seed has no draining, so a draining instance is simply left out in that mode.
public enum CompatMode: String, Sendable, CaseIterable {
    case none
    case seed
}

public struct RecordLayout: Sendable, Equatable {
    /// Without a trailing slash: `/backends`.
    public let prefix: String
    public let compat: CompatMode

    public init(prefix: String = "/backends", compat: CompatMode = .none) {
        var trimmed = Substring(prefix)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        self.prefix = String(trimmed)
        self.compat = compat
    }

    /// The prefix with its trailing slash: what to read back when checking etcd.
    public var readPrefix: String { prefix + "/" }

    public func instanceKey(service: String, instance: String) -> String {
        "\(prefix)/\(escapeSegment(service))/\(escapeSegment(instance))"
    }

    public func portKey(service: String) -> String {
        "\(prefix)/\(escapeSegment(service))/port"
    }

    /// Every key this host should have, with its value. When two instances of one service
    /// disagree on the seed's `port` key, the first in key order wins.
    public func table(_ registrations: [Registration]) -> [String: String] {
        var result: [String: String] = [:]
        let ordered = registrations.sorted { ($0.service, $0.instance) < ($1.service, $1.instance) }
        for registration in ordered {
            let key = instanceKey(service: registration.service, instance: registration.instance)
            switch compat {
            case .none:
                result[key] = encodeRecord(registration)
            case .seed:
                guard !registration.draining else { continue }
                result[key] = seedValue(registration)
                let port = portKey(service: registration.service)
                if result[port] == nil { result[port] = String(registration.listen) }
            }
        }
        return result
    }

    private func seedValue(_ registration: Registration) -> String {
        registration.host.contains(":") ? "[\(registration.host)]:\(registration.port)" : "\(registration.host):\(registration.port)"
    }
}

/// The one rule for a name as a key segment (the discovery side's `KeySegment`): `%` → `%25`,
/// `/` → `%2F` anywhere, a leading `_` → `%5F` (so no name collides with `_config`).
/// `jwilder/whoami` → `jwilder%2Fwhoami`.
public func escapeSegment(_ name: String) -> String {
    var output = ""
    output.reserveCapacity(name.utf8.count)
    for (offset, character) in name.enumerated() {
        switch character {
        case "%": output += "%25"
        case "/": output += "%2F"
        case "_" where offset == 0: output += "%5F"
        default: output.append(character)
        }
    }
    return output
}

/// Berth's JSON value, fields in a fixed order and `meta` sorted, so one registration always
/// encodes to the same text (the registrar compares texts to decide what to write):
/// `{"host":"127.0.0.1","port":32768,"listen":8000,"weight":1,"tags":[],"meta":{},"draining":false}`.
public func encodeRecord(_ registration: Registration) -> String {
    var json = "{\"host\":\(jsonString(registration.host)),\"port\":\(registration.port),\"listen\":\(registration.listen)"
    json += ",\"weight\":\(registration.weight),\"tags\":["
    json += registration.tags.map(jsonString).joined(separator: ",")
    json += "],\"meta\":{"
    json += registration.meta.sorted { $0.key < $1.key }.map { "\(jsonString($0.key)):\(jsonString($0.value))" }.joined(separator: ",")
    json += "},\"draining\":\(registration.draining)}"
    return json
}

/// A JSON string literal (RFC 8259 escapes; other characters as UTF-8).
func jsonString(_ text: String) -> String {
    var output = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": output += "\\\""
        case "\\": output += "\\\\"
        case "\n": output += "\\n"
        case "\r": output += "\\r"
        case "\t": output += "\\t"
        case _ where scalar.value < 0x20:
            let hex = String(scalar.value, radix: 16)
            output += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
        default: output.unicodeScalars.append(scalar)
        }
    }
    return output + "\""
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
