import FoundationEssentials

/// A container event from `GET /events`, reduced to what registration acts on.
public struct DockerEvent: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        case start
        case die
        case stop
        /// `docker kill` or the first step of `docker stop`; the signal number when Docker says.
        case kill(signal: Int?)
        case pause
        case unpause
        case destroy
        /// `health_status: healthy` → "healthy".
        case healthStatus(String)
    }

    public var containerID: String
    public var action: Action

    public init(containerID: String, action: Action) {
        self.containerID = containerID
        self.action = action
    }
}

/// One line of the event stream, classified. Only `.event` is acted on; the others are
/// counted as skipped and logged.
public enum EventLine: Sendable, Equatable {
    case event(DockerEvent)
    /// Well-formed JSON that is not a container event we act on (another type or action).
    case unknown(String)
    /// Not a JSON event object at all.
    case garbage(String)
}

public enum DockerEventParser {
    /// The `filters` query of the event stream: container events of the kinds above. Docker
    /// matches `health_status` against `health_status: <status>` by prefix.
    public static let filters = #"{"type":["container"],"event":["start","die","stop","kill","pause","unpause","destroy","health_status"]}"#

    private struct Wire: Decodable {
        struct Actor: Decodable {
            var ID: String?
            var Attributes: [String: String]?
        }
        var `Type`: String?
        var Action: String?
        var status: String?
        var id: String?
        var Actor: Actor?
    }

    /// Classifies one line (without its newline). Never throws: bad input is `.garbage`.
    public static func parse(_ line: some Collection<UInt8>) -> EventLine {
        let wire: Wire
        do {
            wire = try JSONDecoder().decode(Wire.self, from: Data(line))
        } catch {
            return .garbage("not a JSON event object")
        }
        let type = wire.`Type` ?? "container"
        guard type == "container" else { return .unknown("event type '\(type)'") }
        guard let actionText = wire.Action ?? wire.status else { return .garbage("event without an action") }
        guard let id = wire.Actor?.ID ?? wire.id, isContainerID(id) else { return .garbage("event without a container id") }
        let attributes = wire.Actor?.Attributes ?? [:]
        let action: DockerEvent.Action
        switch actionText {
        case "start": action = .start
        case "die": action = .die
        case "stop": action = .stop
        case "kill": action = .kill(signal: attributes["signal"].flatMap(signalNumber))
        case "pause": action = .pause
        case "unpause": action = .unpause
        case "destroy": action = .destroy
        case _ where actionText.hasPrefix("health_status"):
            let status = actionText.split(separator: ":", maxSplits: 1).dropFirst().first.map { String($0).trimmedSpaces } ?? ""
            action = .healthStatus(status)
        default:
            return .unknown("action '\(actionText.prefix(40))'")
        }
        return .event(DockerEvent(containerID: id, action: action))
    }

    /// Docker sends `"15"`; older daemons and other tools may send `SIGTERM` or `TERM`.
    static func signalNumber(_ text: String) -> Int? {
        if let number = Int(text) { return number }
        let names = ["HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15]
        var name = Substring(text.uppercased())
        if name.hasPrefix("SIG") { name = name.dropFirst(3) }
        return names[String(name)]
    }

    /// Signals after which a container is expected to stop (so its instances start draining).
    public static func isTerminating(signal: Int?) -> Bool {
        guard let signal else { return true }
        return [2, 3, 9, 15].contains(signal)
    }

    static func isContainerID(_ id: String) -> Bool {
        !id.isEmpty && id.count <= 128 && id.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) || ($0 >= 65 && $0 <= 70) }
    }
}

/// Splits a byte stream into lines, with a bound: a line longer than `maximumLength` is
/// reported once as `.overlong` and its bytes up to the next newline are dropped (the buffer
/// never holds more than `maximumLength` bytes). Empty lines are skipped; `\r\n` is accepted.
public struct LineSplitter: Sendable {
    public enum Piece: Sendable, Equatable {
        case line([UInt8])
        case overlong
    }

    public let maximumLength: Int
    private var buffer: [UInt8] = []
    private var discarding = false

    public init(maximumLength: Int = 1 << 20) {
        self.maximumLength = maximumLength
    }

    /// Splits at newlines with one search per line (not a loop per byte): a 1 MiB line costs
    /// one copy, or none once it is known to be over the bound.
    public mutating func append(_ bytes: some Collection<UInt8>) -> [Piece] {
        var pieces: [Piece] = []
        var rest = bytes[...]
        while let newline = rest.firstIndex(of: UInt8(ascii: "\n")) {
            let segment = rest[..<newline]
            if discarding {
                discarding = false
            } else if buffer.count + segment.count > maximumLength {
                pieces.append(.overlong)
            } else {
                buffer.append(contentsOf: segment)
                if buffer.last == UInt8(ascii: "\r") { buffer.removeLast() }
                if !buffer.isEmpty { pieces.append(.line(buffer)) }
            }
            buffer.removeAll(keepingCapacity: buffer.count <= 4096)
            rest = rest[rest.index(after: newline)...]
        }
        if !discarding && !rest.isEmpty {
            if buffer.count + rest.count > maximumLength {
                pieces.append(.overlong)
                buffer.removeAll(keepingCapacity: false)
                discarding = true
            } else {
                buffer.append(contentsOf: rest)
            }
        }
        return pieces
    }
}
