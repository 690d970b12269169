import BerthSystem

/// The registry's key layout in etcd (docs/REGISTRY.md). Pure: text in, classification out.
///
/// ```
/// <prefix>/<service>/<instance>   an instance: Berth JSON or HOST:PORT
/// <prefix>/<service>/port         the seed's layout: the service's listen port
/// <prefix>/_config/<service>      service settings (JSON)
/// ```
/// Service names and instance ids are one key segment each, escaped by `KeySegment`.
public struct RegistryLayout: Sendable, Equatable {
    /// The prefix without a trailing slash, e.g. `/backends`. May be empty (keys at the root).
    public let prefix: String

    /// The instance id that holds the seed's listen port, reserved in every service.
    public static let portSegment = "port"
    /// The pseudo-service whose children are service settings, reserved.
    public static let configSegment = "_config"

    /// `prefix` with or without a trailing slash: `/backends` and `/backends/` are the same.
    public init(prefix: String = "/backends") {
        var trimmed = Substring(prefix)
        while trimmed.hasSuffix("/") { trimmed = trimmed.dropLast() }
        self.prefix = String(trimmed)
    }

    /// What to Range and Watch: the prefix with its trailing slash, so that `/backends2/...`
    /// is not read for `/backends`.
    public var watchPrefix: String { prefix + "/" }

    /// The key of one instance. Throws for the reserved instance id `port` and empty names.
    public func instanceKey(service: String, instance: String) throws(KeyError) -> String {
        guard !service.isEmpty, !instance.isEmpty else { throw KeyError(reason: .emptySegment, key: "\(service)/\(instance)") }
        guard instance != Self.portSegment else { throw KeyError(reason: .reservedName, key: instance) }
        return "\(watchPrefix)\(KeySegment.encode(service))/\(KeySegment.encode(instance))"
    }

    /// The seed's listen-port key of a service.
    public func portKey(service: String) -> String {
        "\(watchPrefix)\(KeySegment.encode(service))/\(Self.portSegment)"
    }

    /// The settings key of a service.
    /// The prefix of a service's instance keys (and of the seed's port key): what a host that
    /// watches only some services watches for each (with `configPrefix` for their settings).
    public func servicePrefix(_ service: String) -> String {
        "\(watchPrefix)\(KeySegment.encode(service))/"
    }

    /// The prefix of every service's `_config` key.
    public var configPrefix: String { "\(watchPrefix)\(Self.configSegment)/" }

    public func configKey(service: String) -> String {
        "\(watchPrefix)\(Self.configSegment)/\(KeySegment.encode(service))"
    }

    /// Classifies a key as etcd returns it (bytes); a key that is not UTF-8 is malformed.
    public func classify(_ key: [UInt8]) -> KeyClass {
        guard let text = String(validating: key, as: UTF8.self) else {
            let shown = String(decoding: key, as: UTF8.self)
            return shown.hasPrefix(watchPrefix) ? .malformed(KeyError(reason: .keyNotUTF8, key: shown)) : .ignored(.outsidePrefix)
        }
        return classify(text)
    }

    /// Classifies a key read from etcd. Never throws: a key that is not ours is `.ignored`,
    /// one that is under the prefix but does not fit the layout is `.malformed`.
    public func classify(_ key: String) -> KeyClass {
        guard key.hasPrefix(watchPrefix) else { return .ignored(.outsidePrefix) }
        let rest = key.dropFirst(watchPrefix.count)
        let segments = rest.split(separator: "/", omittingEmptySubsequences: false)
        guard segments.count == 2 else {
            return .malformed(KeyError(reason: .wrongDepth, key: key))
        }
        if segments[0] == Self.configSegment {
            switch KeySegment.decode(segments[1]) {
            case .success(let service): return .config(service: service)
            case .failure(let reason): return .malformed(KeyError(reason: reason, key: key))
            }
        }
        if segments[0].hasPrefix("_") { return .ignored(.reservedService) }
        let service: String
        switch KeySegment.decode(segments[0]) {
        case .success(let decoded): service = decoded
        case .failure(let reason): return .malformed(KeyError(reason: reason, key: key))
        }
        if segments[1] == Self.portSegment { return .port(service: service) }
        switch KeySegment.decode(segments[1]) {
        case .success(let instance): return .instance(service: service, instance: instance)
        case .failure(let reason): return .malformed(KeyError(reason: reason, key: key))
        }
    }
}

/// What a key is, per `RegistryLayout.classify`.
public enum KeyClass: Sendable, Equatable {
    /// `<prefix>/<service>/<instance>`: names decoded.
    case instance(service: String, instance: String)
    /// `<prefix>/<service>/port`: the seed's listen port.
    case port(service: String)
    /// `<prefix>/_config/<service>`.
    case config(service: String)
    /// Not ours: skipped without counting.
    case ignored(IgnoredReason)
    /// Under the prefix but not in the layout: skipped and counted.
    case malformed(KeyError)
}

public enum IgnoredReason: String, Sendable, Equatable {
    /// The key does not start with `<prefix>/`.
    case outsidePrefix = "outside the prefix"
    /// A service name beginning with `_` other than `_config`: reserved for later layouts.
    case reservedService = "reserved service name"
    /// A service this host does not watch (`--services`).
    case otherService = "a service not watched here"
}

/// A key under the prefix that does not fit the layout.
public struct KeyError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: String, Error, Sendable, Equatable {
        case wrongDepth = "not <prefix>/<service>/<instance>"
        case emptySegment = "empty name"
        case badEscape = "bad %XX escape"
        case notUTF8 = "escape decodes to invalid UTF-8"
        case nonCanonical = "escape not in canonical form"
        case reservedName = "reserved name"
        case keyNotUTF8 = "key is not UTF-8"
    }

    public let reason: Reason
    public let key: String

    public var description: String { "key '\(key)': \(reason.rawValue)" }
}

/// The one escaping rule for a service name or instance id as a key segment:
///
/// - `%` → `%25` and `/` → `%2F` anywhere, so `jwilder/whoami` is the segment `jwilder%2Fwhoami`;
/// - a leading `_` → `%5F`, so no name collides with `_config` (or later reserved segments).
///
/// Nothing else is escaped. Decoding accepts exactly the canonical form: every `%` must be one
/// of those escapes (upper-case hex), so each name has one key and each key one name.
public enum KeySegment {
    public static func encode(_ name: String) -> String {
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

    /// Decodes a segment; fails on an empty segment or one not in canonical form.
    public static func decode(_ segment: Substring) -> Result<String, KeyError.Reason> {
        guard !segment.isEmpty else { return .failure(.emptySegment) }
        guard segment.utf8.contains(UInt8(ascii: "%")) else { return .success(String(segment)) }
        guard let bytes = PercentEncoding.decodeBytes(segment.utf8) else { return .failure(.badEscape) }
        guard let decoded = String(validating: bytes, as: UTF8.self) else { return .failure(.notUTF8) }
        guard !decoded.isEmpty else { return .failure(.emptySegment) }
        guard encode(decoded) == segment else { return .failure(.nonCanonical) }
        return .success(decoded)
    }
}
