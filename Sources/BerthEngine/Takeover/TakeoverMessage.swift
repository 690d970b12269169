import BerthSystem

/// The messages of a takeover (`--takeover-socket`), as text lines: pure, no I/O.
///
/// ```
///  new process                           running process
///  hello (protocol, version)  ────────▶
///                             ◀────────  offer (protocol, version, lease, frontends) + the fds
///  (installs its first table, adopting them)
///  taken-over | abort reason  ────────▶  (stops accepting, keeps the lease, drains, exits)
/// ```
/// Each message goes in one frame (`TakeoverFrame`); the offer's descriptors follow it, in the
/// order of its frontends, at most `UnixSockets.descriptorsPerMessage` per frame.
public enum TakeoverMessage: Sendable, Equatable {
    case hello(protocolVersion: Int, version: String)
    case offer(TakeoverOffer)
    case takenOver
    case abort(reason: String)

    /// This build's protocol. A peer speaking another is refused (the new process starts alone).
    public static let protocolVersion = 1
    static let magic = "berth-takeover"

    public func encode() -> [UInt8] {
        var lines: [String]
        switch self {
        case .hello(let protocolVersion, let version):
            lines = ["\(Self.magic) \(protocolVersion) hello", "version \(Self.escape(version))"]
        case .offer(let offer):
            lines = ["\(Self.magic) \(offer.protocolVersion) offer", "version \(Self.escape(offer.version))",
                     "lease \(offer.leaseID.map(String.init) ?? "none")"]
            for group in offer.frontends {
                lines.append("frontend \(Self.escape(group.name)) \(group.requested) \(group.bound) \(group.count)")
            }
        case .takenOver:
            lines = ["\(Self.magic) \(Self.protocolVersion) taken-over"]
        case .abort(let reason):
            lines = ["\(Self.magic) \(Self.protocolVersion) abort", "reason \(Self.escape(reason))"]
        }
        return Array((lines.joined(separator: "\n") + "\n").utf8)
    }

    /// Parses one message; anything else (garbage, a cut message, another protocol's offer
    /// fields) is a `TakeoverMessageError` naming what is wrong.
    public static func decode(_ bytes: [UInt8]) throws(TakeoverMessageError) -> TakeoverMessage {
        guard let text = String(validating: bytes, as: UTF8.self) else { throw .init("not UTF-8") }
        guard text.hasSuffix("\n") else { throw .init("truncated (no final newline)") }
        let lines = text.dropLast().split(separator: "\n", omittingEmptySubsequences: false).map { $0.split(separator: " ", omittingEmptySubsequences: false) }
        guard let head = lines.first, head.count == 3, head[0] == magic, let version = Int(head[1]), version > 0 else {
            throw .init("not a takeover message")
        }
        var fields = Fields(lines: lines.dropFirst())
        switch head[2] {
        case "hello":
            let message = TakeoverMessage.hello(protocolVersion: version, version: try fields.text("version"))
            try fields.end()
            return message
        case "offer":
            var offer = TakeoverOffer(protocolVersion: version, version: try fields.text("version"))
            let lease = try fields.text("lease")
            if lease != "none" {
                guard let id = Int64(lease) else { throw .init("lease '\(lease)' is not a number") }
                offer.leaseID = id
            }
            while let line = fields.next(named: "frontend") {
                guard line.count == 4, let requested = try? SocketAddress(parsing: String(line[1])),
                      let bound = try? SocketAddress(parsing: String(line[2])), let count = Int(line[3]),
                      (1...TakeoverOffer.maximumListenersPerFrontend).contains(count) else {
                    throw .init("bad frontend line")
                }
                offer.frontends.append(.init(name: try unescape(String(line[0])), requested: requested, bound: bound, count: count))
            }
            try fields.end()
            guard offer.descriptorCount <= TakeoverOffer.maximumDescriptors else { throw .init("too many listeners") }
            return .offer(offer)
        case "taken-over":
            try fields.end()
            return .takenOver
        case "abort":
            let reason = try fields.text("reason")
            try fields.end()
            return .abort(reason: reason)
        default:
            throw .init("unknown message '\(head[2])'")
        }
    }

    /// Names and versions travel as one word: `%`, space, newline and other controls as `%XX`.
    static func escape(_ text: String) -> String {
        text.isEmpty ? "%" : String(decoding: escapeUTF8(text), as: UTF8.self)
    }

    private static func escapeUTF8(_ text: String) -> [UInt8] {
        var result: [UInt8] = []
        for byte in text.utf8 {
            if byte <= 0x20 || byte == 0x25 || byte == 0x7f {
                result.append(0x25)
                result.append(contentsOf: String(byte >> 4, radix: 16).utf8)
                result.append(contentsOf: String(byte & 15, radix: 16).utf8)
            } else {
                result.append(byte)
            }
        }
        return result
    }

    static func unescape(_ word: String) throws(TakeoverMessageError) -> String {
        if word == "%" { return "" }
        let bytes = Array(word.utf8)
        var result: [UInt8] = []
        var index = 0
        while index < bytes.count {
            if bytes[index] == 0x25 {
                guard index + 2 < bytes.count, let value = UInt8(String(decoding: bytes[index + 1...index + 2], as: UTF8.self), radix: 16) else {
                    throw .init("bad escape in '\(word)'")
                }
                result.append(value)
                index += 3
            } else {
                result.append(bytes[index])
                index += 1
            }
        }
        guard let text = String(validating: result, as: UTF8.self) else { throw .init("not UTF-8 in '\(word)'") }
        return text
    }

    /// The lines after the first, read in order.
    private struct Fields {
        var lines: ArraySlice<[Substring]>

        mutating func text(_ name: String) throws(TakeoverMessageError) -> String {
            guard let line = lines.first, line.count == 2, line[0] == name else { throw .init("missing \(name)") }
            lines.removeFirst()
            return try TakeoverMessage.unescape(String(line[1]))
        }

        mutating func next(named name: String) -> [Substring]? {
            guard let line = lines.first, line.first.map(String.init) == name else { return nil }
            lines.removeFirst()
            return Array(line.dropFirst())
        }

        func end() throws(TakeoverMessageError) {
            if !lines.isEmpty { throw .init("unexpected line '\(lines.first!.joined(separator: " "))'") }
        }
    }
}

/// What the running process hands over: its version, its etcd lease, and per frontend the
/// address asked for, the address bound and how many listening sockets (one per worker).
public struct TakeoverOffer: Sendable, Equatable {
    public struct Frontend: Sendable, Equatable {
        public var name: String
        public var requested: SocketAddress
        public var bound: SocketAddress
        public var count: Int

        public init(name: String, requested: SocketAddress, bound: SocketAddress, count: Int) {
            self.name = name
            self.requested = requested
            self.bound = bound
            self.count = count
        }
    }

    /// Bounds on what a peer may make us receive.
    public static let maximumListenersPerFrontend = 1024
    public static let maximumDescriptors = 16_384

    public var protocolVersion: Int
    public var version: String
    public var leaseID: Int64?
    public var frontends: [Frontend] = []

    public init(protocolVersion: Int = TakeoverMessage.protocolVersion, version: String, leaseID: Int64? = nil, frontends: [Frontend] = []) {
        self.protocolVersion = protocolVersion
        self.version = version
        self.leaseID = leaseID
        self.frontends = frontends
    }

    public var descriptorCount: Int { frontends.reduce(0) { $0 + $1.count } }
}

public struct TakeoverMessageError: Error, Equatable, CustomStringConvertible, Sendable {
    public let reason: String
    init(_ reason: String) { self.reason = reason }
    public var description: String { "bad takeover message: \(reason)" }
}

/// Frames on the takeover socket: a 4-byte big-endian length, then the message.
public enum TakeoverFrame {
    /// No message is longer (an offer of a few thousand frontends fits).
    public static let maximumLength = 1 << 20

    public static func encode(_ payload: [UInt8]) -> [UInt8] {
        let length = UInt32(payload.count)
        return [UInt8(length >> 24), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff)] + payload
    }

    /// The length a header announces; nil when it passes `maximumLength`.
    public static func length(header: [UInt8]) -> Int? {
        precondition(header.count == 4)
        let length = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
        return length <= maximumLength ? length : nil
    }
}
