import BerthEngine
import BerthHealth
import BerthRegistry
import BerthSystem

/// The last routing state applied, as `--state-file` keeps it: the desired table (frontends with
/// their listen address and settings, backends with name, address, weight, enabled), each
/// backend's health and operator override, and when it was saved. Pure value.
public struct SavedState: Sendable, Equatable {
    /// The desired table; its `revision` is the etcd revision it came from.
    public var table: RoutingTable
    /// Health of the checked backends (others have no entry).
    public var health: [BackendKey: HealthStatus]
    /// Operator overrides in force (`ready` is no entry).
    public var adminStates: [BackendKey: AdminState]
    /// Operator weights in force (`berth ctl weight`).
    public var weights: [BackendKey: Int] = [:]
    /// Unix time (seconds) of the write; 0 until written.
    public var savedAt: Int64

    public init(table: RoutingTable, health: [BackendKey: HealthStatus] = [:],
                adminStates: [BackendKey: AdminState] = [:], savedAt: Int64 = 0) {
        self.table = table
        self.health = health
        self.adminStates = adminStates
        self.savedAt = savedAt
    }
}

/// Why a state file was not used. Every case is reported and the file ignored, never served.
public enum StateFileError: Error, Equatable, CustomStringConvertible, Sendable {
    case notAStateFile
    case unsupportedVersion(String)
    /// The body is shorter (or longer) than the header says: an interrupted or appended write.
    case wrongLength(expected: Int, found: Int)
    case checksumMismatch
    case malformed(line: Int, reason: String)

    public var description: String {
        switch self {
        case .notAStateFile: "not a Berth state file (no 'berth-state' header line)"
        case .unsupportedVersion(let version): "state file version \(version) is not supported (this Berth reads versions 1 to \(StateFile.version))"
        case .wrongLength(let expected, let found): "truncated or damaged: the header says \(expected) bytes of body, the file has \(found)"
        case .checksumMismatch: "damaged: the body's CRC32 does not match the header"
        case .malformed(let line, let reason): "line \(line): \(reason)"
        }
    }
}

/// The state file's format, version 2. One header line, then a text body:
/// ```
/// berth-state 2 <body length in bytes> <CRC32 of the body, 8 hex digits>
/// revision 42
/// saved 1764930000
/// frontend web 0.0.0.0:8080 retries=3 connect=5000 client=60000 server=60000 retry-empty=0 retry-timeout=0 first-byte=2000 replay=16384 balance=roundrobin proxy=none log=0 slow-start=0
/// backend web-1 10.0.0.5:8000 weight=1 enabled=1 health=up admin=ready set-weight=none
/// ```
/// Names are percent-encoded; a backend line belongs to the frontend line above it. Decoding
/// checks the length and checksum first, then every value as the registry's parsers do.
/// Version 1 (written before slow start and operator weights) is still read: its lines lack
/// the last field.
public enum StateFile {
    public static let version = 2
    static let magic = "berth-state"
    /// A longer header line is not ours.
    static let headerLimit = 64
    static let nameLimit = 1024
    /// Timeouts are at most 2^31 - 1 ms, as the registry's durations.
    static let timeRange: ClosedRange<Int64> = 0...Int64(Int32.max)

    public static func encode(_ state: SavedState) -> [UInt8] {
        var body = "revision \(state.table.revision)\nsaved \(state.savedAt)\n"
        for frontend in state.table.frontends {
            let settings = frontend.settings
            body += "frontend \(escape(frontend.name)) \(frontend.listen)"
                + " retries=\(settings.retries) connect=\(settings.connectTimeout) client=\(settings.clientTimeout)"
                + " server=\(settings.serverTimeout) retry-empty=\(flag(settings.retryOnEmptyResponse))"
                + " retry-timeout=\(flag(settings.retryOnResponseTimeout)) first-byte=\(settings.firstByteTimeout)"
                + " replay=\(settings.replayLimit) balance=\(settings.balance.rawValue)"
                + " proxy=\(settings.sendProxy?.rawValue ?? "none") log=\(flag(settings.logConnections))"
                + " slow-start=\(settings.slowStart)\n"
            for backend in frontend.backends {
                let key = BackendKey(frontend: frontend.name, backend: backend.name)
                body += "backend \(escape(backend.name)) \(backend.address) weight=\(backend.weight)"
                    + " enabled=\(flag(backend.enabled)) health=\(state.health[key]?.rawValue ?? "none")"
                    + " admin=\((state.adminStates[key] ?? .ready).rawValue)"
                    + " set-weight=\(state.weights[key].map(String.init) ?? "none")\n"
            }
        }
        let bytes = Array(body.utf8)
        return Array("\(magic) \(version) \(bytes.count) \(hex(CRC32.checksum(bytes)))\n".utf8) + bytes
    }

    public static func decode(_ bytes: [UInt8]) throws(StateFileError) -> SavedState {
        guard let newline = bytes.prefix(headerLimit).firstIndex(of: UInt8(ascii: "\n")),
              let header = String(validating: bytes[..<newline], as: UTF8.self) else { throw .notAStateFile }
        let fields = header.split(separator: " ", omittingEmptySubsequences: false)
        guard fields.count == 4, fields[0] == magic else { throw .notAStateFile }
        guard let fileVersion = Int(fields[1]), fields[1].utf8.count == 1, (1...version).contains(fileVersion) else {
            throw .unsupportedVersion(String(fields[1].prefix(16)))
        }
        guard let length = Int(fields[2]), length >= 0, fields[3].utf8.count == 8, let crc = UInt32(fields[3], radix: 16) else {
            throw .notAStateFile
        }
        let body = bytes[(newline + 1)...]
        guard body.count == length else { throw .wrongLength(expected: length, found: body.count) }
        guard CRC32.checksum(body) == crc else { throw .checksumMismatch }
        guard let text = String(validating: body, as: UTF8.self) else { throw .malformed(line: 2, reason: "not UTF-8") }
        var parser = BodyParser(version: fileVersion)
        return try parser.parse(text)
    }

    static func escape(_ name: String) -> String { PercentEncoding.encode(name) }
    static func flag(_ value: Bool) -> String { value ? "1" : "0" }
    static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }
}

/// Reads a body line by line; every value is checked, the first problem throws.
private struct BodyParser {
    /// The file's version: 1 lacks the last field of frontend and backend lines.
    let version: Int
    var state = SavedState(table: RoutingTable())
    var lineNumber = 1
    var sawRevision = false
    var sawSaved = false

    mutating func parse(_ text: String) throws(StateFileError) -> SavedState {
        guard text.isEmpty || text.last == "\n" else { throw .malformed(line: lineNumber, reason: "the last line does not end") }
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            lineNumber += 1
            let words = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            switch words.first {
            case "revision" where words.count == 2 && !sawRevision:
                state.table.revision = try number(words[1], in: 0...UInt64(Int64.max), "revision")
                sawRevision = true
            case "saved" where words.count == 2 && !sawSaved:
                state.savedAt = try number(words[1], in: 0...Int64.max, "saved")
                sawSaved = true
            case "frontend" where words.count == (version == 1 ? 14 : 15):
                try frontend(words)
            case "backend" where words.count == (version == 1 ? 7 : 8):
                try backend(words)
            default:
                throw fail("unexpected line '\(line.prefix(80))'")
            }
        }
        guard sawRevision, sawSaved else { throw fail("the revision or saved line is missing") }
        if let problem = state.table.validationError() { throw fail(problem) }
        return state
    }

    private mutating func frontend(_ words: [String]) throws(StateFileError) {
        let name = try self.name(words[1])
        let listen = try address(words[2], "listen address")
        let values = try keyValues(words[3...], ["retries", "connect", "client", "server", "retry-empty", "retry-timeout",
                                                  "first-byte", "replay", "balance", "proxy", "log"] + (version == 1 ? [] : ["slow-start"]))
        var settings = FrontendSettings()
        settings.retries = try number(values[0], in: 0...100, "retries")
        settings.connectTimeout = try number(values[1], in: StateFile.timeRange, "connect")
        settings.clientTimeout = try number(values[2], in: StateFile.timeRange, "client")
        settings.serverTimeout = try number(values[3], in: StateFile.timeRange, "server")
        settings.retryOnEmptyResponse = try flag(values[4], "retry-empty")
        settings.retryOnResponseTimeout = try flag(values[5], "retry-timeout")
        settings.firstByteTimeout = try number(values[6], in: StateFile.timeRange, "first-byte")
        settings.replayLimit = try number(values[7], in: 1...(16 << 20), "replay")
        guard let balance = BalanceMode(rawValue: values[8]) else { throw fail("unknown balance '\(values[8].prefix(32))'") }
        settings.balance = balance
        if values[9] != "none" {
            guard let proxy = ProxyProtocolVersion(rawValue: values[9]) else { throw fail("unknown proxy '\(values[9].prefix(32))'") }
            settings.sendProxy = proxy
        }
        settings.logConnections = try flag(values[10], "log")
        if version > 1 { settings.slowStart = try number(values[11], in: StateFile.timeRange, "slow-start") }
        state.table.frontends.append(Frontend(name: name, listen: listen, backends: [], settings: settings))
    }

    private mutating func backend(_ words: [String]) throws(StateFileError) {
        guard let frontend = state.table.frontends.last?.name else { throw fail("a backend before any frontend") }
        let name = try self.name(words[1])
        let address = try address(words[2], "backend address")
        let values = try keyValues(words[3...], ["weight", "enabled", "health", "admin"] + (version == 1 ? [] : ["set-weight"]))
        let backend = Backend(name: name, address: address, enabled: try flag(values[1], "enabled"),
                              weight: try number(values[0], in: 0...256, "weight"))
        let key = BackendKey(frontend: frontend, backend: name)
        if values[2] != "none" {
            guard let health = HealthStatus(rawValue: values[2]) else { throw fail("unknown health '\(values[2].prefix(32))'") }
            state.health[key] = health
        }
        guard let admin = AdminState(rawValue: values[3]) else { throw fail("unknown admin state '\(values[3].prefix(32))'") }
        if admin != .ready { state.adminStates[key] = admin }
        if version > 1 && values[4] != "none" { state.weights[key] = try number(values[4], in: 0...256, "set-weight") }
        state.table.frontends[state.table.frontends.count - 1].backends.append(backend)
    }

    private func fail(_ reason: String) -> StateFileError { .malformed(line: lineNumber, reason: reason) }

    private func name(_ text: String) throws(StateFileError) -> String {
        guard let name = PercentEncoding.decode(text), !name.isEmpty, name.utf8.count <= StateFile.nameLimit,
              !name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) else {
            throw fail("invalid name '\(text.prefix(80))'")
        }
        return name
    }

    /// A numeric `HOST:PORT` with a port from 1 to 65535, as the registry's values.
    private func address(_ text: String, _ what: String) throws(StateFileError) -> SocketAddress {
        let address: SocketAddress
        do {
            address = try SocketAddress(parsing: text)
        } catch {
            throw fail("\(what): \(error)")
        }
        guard address.port != 0 else { throw fail("\(what) '\(text.prefix(80))' has port 0") }
        return address
    }

    /// `key=value` words in exactly this order.
    private func keyValues(_ words: ArraySlice<String>, _ keys: [String]) throws(StateFileError) -> [String] {
        guard words.count == keys.count else { throw fail("expected \(keys.count) settings") }
        var values: [String] = []
        for (word, key) in zip(words, keys) {
            guard word.hasPrefix(key + "=") else { throw fail("expected '\(key)=' in '\(word.prefix(80))'") }
            values.append(String(word.dropFirst(key.count + 1)))
        }
        return values
    }

    private func number<Value: FixedWidthInteger>(_ text: String, in range: ClosedRange<Value>, _ what: String) throws(StateFileError) -> Value {
        guard text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
              let value = Value(text), range.contains(value) else {
            throw fail("\(what) '\(text.prefix(32))' is not a number from \(range.lowerBound) to \(range.upperBound)")
        }
        return value
    }

    private func flag(_ text: String, _ what: String) throws(StateFileError) -> Bool {
        switch text {
        case "1": return true
        case "0": return false
        default: throw fail("\(what) must be 0 or 1")
        }
    }
}

/// CRC-32 (IEEE 802.3, the polynomial of zlib and gzip).
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { index in
        var value = UInt32(index)
        for _ in 0..<8 { value = value & 1 == 1 ? 0xEDB8_8320 ^ (value >> 1) : value >> 1 }
        return value
    }

    public static func checksum(_ bytes: some Collection<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return ~crc
    }
}
