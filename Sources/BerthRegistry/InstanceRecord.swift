import BerthSystem

/// One registered instance of a service: where to dial it, and what the registrar said about it.
/// Read from either value format (`parse`), written by the registrar in either (`encodedJSON`,
/// `encodedHostPort`).
public struct InstanceRecord: Sendable, Equatable {
    /// IPv4 (`127.0.0.5`), IPv6 without brackets (`::1`) or a DNS name (resolved off the loops).
    public var host: String
    /// The port to dial (the container's published port).
    public var port: UInt16
    /// The service's listen port on every discovery host; nil: from `_config`, the `port` key
    /// or `--default-listen`.
    public var listen: UInt16?
    /// nil means `tcp`, the only protocol served.
    public var proto: String?
    /// 0...256 as HAProxy's; carried for later balancing policies, not used by round-robin.
    public var weight: Int?
    public var tags: [String]
    public var meta: [String: String]
    /// An operator's drain: the backend stays in the table, disabled (no new connections).
    public var draining: Bool

    public init(host: String, port: UInt16, listen: UInt16? = nil, proto: String? = nil, weight: Int? = nil,
                tags: [String] = [], meta: [String: String] = [:], draining: Bool = false) {
        self.host = host
        self.port = port
        self.listen = listen
        self.proto = proto
        self.weight = weight
        self.tags = tags
        self.meta = meta
        self.draining = draining
    }

    /// What kind of host this record names.
    public var hostKind: HostKind { HostKind.classify(host) ?? .name }

    /// Reads a value: Berth's JSON when it starts with `{` (after white space), otherwise the
    /// seed's and registrator's `HOST:PORT`. Never traps; every failure is a `ValueError`.
    public static func parse(_ bytes: [UInt8]) throws(ValueError) -> InstanceRecord {
        guard bytes.count <= JSONValue.maximumBytes else {
            throw ValueError(.tooLarge, "\(bytes.count) bytes (limit \(JSONValue.maximumBytes))")
        }
        guard let first = bytes.first(where: { !isWhiteSpace($0) }) else {
            throw ValueError(.empty, "empty value")
        }
        if first == UInt8(ascii: "{") { return try parseJSON(bytes) }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ValueError(.notUTF8, "not UTF-8 text")
        }
        let (host, port) = try parseHostPort(text)
        return InstanceRecord(host: host, port: port)
    }

    /// Parses `HOST:PORT`, `[IPv6]:PORT` or `name:PORT`, white space around it trimmed.
    public static func parseHostPort(_ text: String) throws(ValueError) -> (host: String, port: UInt16) {
        let trimmed = trimWhiteSpace(text)
        let host: Substring
        let portText: Substring
        if trimmed.hasPrefix("[") {
            guard let close = trimmed.firstIndex(of: "]") else {
                throw ValueError(.badHost, "missing ']' after the IPv6 address in '\(trimmed)'")
            }
            host = trimmed[trimmed.index(after: trimmed.startIndex)..<close]
            let rest = trimmed[trimmed.index(after: close)...]
            guard rest.hasPrefix(":") else { throw ValueError(.badPort, "expected ':PORT' after ']' in '\(trimmed)'") }
            portText = rest.dropFirst()
            guard HostKind.classify(String(host)) == .ipv6 else {
                throw ValueError(.badHost, "'\(host)' in brackets is not an IPv6 address")
            }
        } else {
            guard let colon = trimmed.lastIndex(of: ":") else {
                throw ValueError(.badPort, "expected HOST:PORT, got '\(trimmed.prefix(80))'")
            }
            host = trimmed[..<colon]
            portText = trimmed[trimmed.index(after: colon)...]
            if host.utf8.contains(UInt8(ascii: ":")) {
                throw ValueError(.badHost, "write IPv6 addresses in brackets, as [::1]:8080")
            }
            guard HostKind.classify(String(host)) != nil else {
                throw ValueError(.badHost, "'\(host.prefix(80))' is not an IPv4 address or a host name")
            }
        }
        guard portText.allSatisfy({ $0.isASCII && $0.isNumber }), portText.count <= 5,
              let port = UInt16(portText), port >= 1 else {
            throw ValueError(.badPort, "port '\(portText.prefix(20))' is not a number from 1 to 65535")
        }
        return (String(host), port)
    }

    private static func parseJSON(_ bytes: [UInt8]) throws(ValueError) -> InstanceRecord {
        let object = try JSONObject(JSONValue.parse(bytes), what: "an instance")
        guard var host = try object.string("host") else { throw ValueError(.missingField, "'host' is missing") }
        guard let port = try object.port("port") else { throw ValueError(.missingField, "'port' is missing") }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard HostKind.classify(host) != nil else {
            throw ValueError(.badHost, "'host' '\(host.prefix(80))' is not an IP address or a host name")
        }
        return InstanceRecord(
            host: host, port: port, listen: try object.port("listen"), proto: try object.string("proto"),
            weight: try object.integer("weight", in: 0...256).map { Int($0) },
            tags: try object.strings("tags") ?? [], meta: try object.stringMap("meta") ?? [:],
            draining: try object.bool("draining") ?? false)
    }

    /// Berth's JSON, keys in a fixed order (host, port, listen, proto, weight, tags, meta,
    /// draining; meta's keys sorted), optional fields left out when unset. One line, no spaces.
    public func encodedJSON() -> String {
        var fields = ["\"host\":\(JSONText.quote(host))", "\"port\":\(port)"]
        if let listen { fields.append("\"listen\":\(listen)") }
        if let proto { fields.append("\"proto\":\(JSONText.quote(proto))") }
        if let weight { fields.append("\"weight\":\(weight)") }
        if !tags.isEmpty { fields.append("\"tags\":[\(tags.map(JSONText.quote).joined(separator: ","))]") }
        if !meta.isEmpty {
            let pairs = meta.keys.sorted().map { "\(JSONText.quote($0)):\(JSONText.quote(meta[$0]!))" }
            fields.append("\"meta\":{\(pairs.joined(separator: ","))}")
        }
        if draining { fields.append("\"draining\":true") }
        return "{\(fields.joined(separator: ","))}"
    }

    /// The seed's `HOST:PORT` (IPv6 in brackets). Carries host and port only.
    public func encodedHostPort() -> String {
        hostKind == .ipv6 ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    public static func isWhiteSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D
    }

    public static func trimWhiteSpace(_ text: String) -> Substring {
        var slice = text[...]
        while let first = slice.utf8.first, isWhiteSpace(first) { slice = slice.dropFirst() }
        while let last = slice.utf8.last, isWhiteSpace(last) { slice = slice.dropLast() }
        return slice
    }
}

/// What a host string is. Classification only; names are resolved by `HostResolver`.
public enum HostKind: Sendable, Equatable {
    case ipv4
    case ipv6
    case name

    /// nil when `host` is none of them: empty, `*`, a dotted-digits string that is not an
    /// IPv4 address, or characters a DNS name cannot have.
    public static func classify(_ host: String) -> HostKind? {
        guard !host.isEmpty, host.utf8.count <= 253, host != "*" else { return nil }
        if host.utf8.contains(UInt8(ascii: ":")) {
            guard let address = try? SocketAddress(host: host, port: 0), address.description.hasPrefix("[") else {
                return nil
            }
            return .ipv6
        }
        if host.utf8.allSatisfy({ ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: ".") }) {
            return (try? SocketAddress(host: host, port: 0)) != nil ? .ipv4 : nil
        }
        let labels = host.split(separator: ".", omittingEmptySubsequences: false)
        for (index, label) in labels.enumerated() {
            // A trailing dot (fully qualified) leaves one empty last label.
            if label.isEmpty && index == labels.count - 1 && index > 0 { continue }
            guard !label.isEmpty, label.utf8.count <= 63, !label.hasPrefix("-"), !label.hasSuffix("-"),
                  label.utf8.allSatisfy(isNameByte) else { return nil }
        }
        return .name
    }

    private static func isNameByte(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "_"): true
        default: false
        }
    }
}

/// A value that does not parse: the reason (counted per kind) and a detail in words.
public struct ValueError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Reason: String, Sendable, Equatable, CaseIterable {
        case empty = "empty value"
        case tooLarge = "value too large"
        case notUTF8 = "not UTF-8"
        case notJSON = "not JSON"
        case notObject = "not a JSON object"
        case missingField = "missing field"
        case wrongType = "wrong type"
        case outOfRange = "number out of range"
        case badPort = "bad port"
        case badHost = "bad host"
        case badDuration = "bad duration"
        case badCheck = "bad check"
    }

    public let reason: Reason
    public let detail: String

    public init(_ reason: Reason, _ detail: String) {
        self.reason = reason
        self.detail = detail
    }

    public var description: String { detail }
}

/// JSON string quoting for the encoders (RFC 8259: quote, backslash and controls escaped).
public enum JSONText {
    public static func quote(_ text: String) -> String {
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
}
