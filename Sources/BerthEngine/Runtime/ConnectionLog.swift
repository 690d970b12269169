import BerthSystem
import Glibc
import Synchronization

/// One closed connection, as HAProxy's `option tcplog` reports it. A plain value: the worker
/// fills one per closed session of a frontend with `logConnections` and hands it to its ring.
public struct ConnectionRecord: Sendable {
    public var client: SocketAddress?
    /// Wall clock at accept, milliseconds since the epoch.
    public var acceptedAt: Int64 = 0
    public var frontend: String = ""
    /// The backend (server) last tried; nil when there was none to try.
    public var backend: String?
    /// Milliseconds: waiting in a queue (Berth has none: always 0), accept to connected (-1:
    /// never connected), accept to close.
    public var queueTime: Int64 = 0
    public var connectTime: Int64 = -1
    public var totalTime: Int64 = 0
    /// Bytes sent to the client (HAProxy's `bytes_read`: read from the server) and received from it.
    public var bytesToClient: UInt64 = 0
    public var bytesFromClient: UInt64 = 0
    /// HAProxy's two-letter termination state (`--`, `CD`, `SD`, `SC`, `sC`, `cD`, `sD`, `KD`, ...).
    public var termination: (UInt8, UInt8) = (UInt8(ascii: "-"), UInt8(ascii: "-"))
    /// Connects retried (on other backends) and redispatches.
    public var retries = 0
    /// Client connections open over all workers at the close.
    public var activeConnections = 0

    public init() {}

    public var terminationText: String { String(decoding: [termination.0, termination.1], as: UTF8.self) }
}

/// How records are written.
public enum ConnectionLogFormat: String, Sendable, CaseIterable {
    /// HAProxy's tcplog line.
    case plain
    /// One JSON object per line.
    case json
}

public struct ConnectionLogSettings: Sendable {
    public var format: ConnectionLogFormat = .plain
    /// Where lines go (stderr by default).
    public var descriptor: CInt = 2
    /// Records each worker's ring holds before new ones are dropped (a power of two).
    public var ringCapacity = 4_096
    /// How often the writer drains the rings (milliseconds).
    public var flushInterval: Int64 = 50

    public init(format: ConnectionLogFormat = .plain) {
        self.format = format
    }
}

/// A bounded single-producer (one worker), single-consumer (the writer thread) ring of records:
/// pushing is two relaxed/acquire loads, a copy into a slot and a release store; no allocation
/// and no system call. A full ring drops the record and counts it.
final class ConnectionRing: @unchecked Sendable {
    private let slots: UnsafeMutablePointer<ConnectionRecord>
    private let mask: Int
    /// Next slot to read (the writer's) and to write (the worker's), as ever-growing counts.
    private let head = Atomic<Int>(0)
    private let tail = Atomic<Int>(0)
    let dropped = Atomic<UInt64>(0)

    init(capacity: Int) {
        var size = 1
        while size < max(2, capacity) { size <<= 1 }
        slots = UnsafeMutablePointer<ConnectionRecord>.allocate(capacity: size)
        slots.initialize(repeating: ConnectionRecord(), count: size)
        mask = size - 1
    }

    deinit {
        slots.deinitialize(count: mask + 1)
        slots.deallocate()
    }

    /// On the worker's thread only.
    @inline(__always)
    func push(_ record: ConnectionRecord) {
        let position = tail.load(ordering: .relaxed)
        guard position - head.load(ordering: .acquiring) <= mask else {
            dropped.add(1, ordering: .relaxed)
            return
        }
        slots[position & mask] = record
        tail.store(position + 1, ordering: .releasing)
    }

    /// On the writer's thread only: every record pushed so far, oldest first.
    func drain(_ body: (ConnectionRecord) -> Void) {
        let end = tail.load(ordering: .acquiring)
        var position = head.load(ordering: .relaxed)
        while position < end {
            body(slots[position & mask])
            position += 1
        }
        head.store(position, ordering: .releasing)
    }
}

/// The connection log of one engine: a ring per worker and one writer thread
/// (`berth-connlog`, started by the first table that has a frontend with `logConnections`),
/// which formats the records and writes them in batches.
public final class ConnectionLog: Sendable {
    public let settings: ConnectionLogSettings
    let rings: [ConnectionRing]
    private let written = Atomic<UInt64>(0)
    private let writeErrors = Atomic<UInt64>(0)
    private let state = Mutex<(started: Bool, stopping: Bool, thread: pthread_t?)>((false, false, nil))
    private let wakeup: WakeupSignal?

    init(settings: ConnectionLogSettings, workers: Int) {
        self.settings = settings
        rings = (0..<workers).map { _ in ConnectionRing(capacity: settings.ringCapacity) }
        wakeup = try? WakeupSignal()
    }

    /// Records written and dropped (a full ring) so far.
    public var writtenRecords: UInt64 { written.load(ordering: .relaxed) }
    public var droppedRecords: UInt64 { rings.reduce(0) { $0 + $1.dropped.load(ordering: .relaxed) } }

    /// Starts the writer thread once.
    func start() {
        let start = state.withLock { state -> Bool in
            guard !state.started, !state.stopping else { return false }
            state.started = true
            return true
        }
        guard start else { return }
        let thread = OSThread(name: "berth-connlog") { [self] in run() }
        state.withLock { $0.thread = thread.handle }
    }

    /// Writes what is left and joins the writer (after the workers stopped).
    func stop() {
        let thread = state.withLock { state -> pthread_t? in
            state.stopping = true
            return state.thread
        }
        if let thread {
            wakeup?.wake()
            pthread_join(thread, nil)
        } else {
            flush()
        }
    }

    private func run() {
        var descriptor = pollfd(fd: wakeup?.fd ?? -1, events: Int16(POLLIN), revents: 0)
        while true {
            let stopping = state.withLock { $0.stopping }
            flush()
            if stopping { return }
            _ = poll(&descriptor, 1, CInt(settings.flushInterval))
        }
    }

    private func flush() {
        var batch: [UInt8] = []
        var count: UInt64 = 0
        for ring in rings {
            ring.drain { record in
                batch += Array(Self.format(record, as: settings.format).utf8)
                count += 1
            }
        }
        guard !batch.isEmpty else { return }
        var offset = 0
        while offset < batch.count {
            let sent = batch.withUnsafeBytes { write(settings.descriptor, $0.baseAddress! + offset, $0.count - offset) }
            if sent < 0 && errno == EINTR { continue }
            if sent <= 0 {
                writeErrors.add(1, ordering: .relaxed)
                break
            }
            offset += sent
        }
        written.add(count, ordering: .relaxed)
    }

    // MARK: Formats

    /// One line, newline included.
    public static func format(_ record: ConnectionRecord, as format: ConnectionLogFormat) -> String {
        let client = record.client.map { ($0.host, Int($0.port)) } ?? ("-", 0)
        let date = acceptDate(record.acceptedAt)
        switch format {
        case .plain:
            // HAProxy's tcplog: client [date] frontend backend/server Tw/Tc/Tt bytes state
            // actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue (Berth: the
            // connection counts it does not keep per frontend and server are written as 0).
            let hostText = client.0.contains(":") ? "[\(client.0)]" : client.0
            return "\(hostText):\(client.1) [\(date)] \(record.frontend) \(record.frontend)/\(record.backend ?? "<NOSRV>") "
                + "\(record.queueTime)/\(record.connectTime)/\(record.totalTime) \(record.bytesToClient) \(record.terminationText) "
                + "\(record.activeConnections)/0/0/0/\(record.retries) 0/0\n"
        case .json:
            return "{\"client_ip\":\(quoted(client.0)),\"client_port\":\(client.1),\"accept_date\":\(quoted(date)),"
                + "\"frontend\":\(quoted(record.frontend)),\"backend\":\(quoted(record.frontend)),"
                + "\"server\":\(record.backend.map(quoted) ?? "null"),\"Tw\":\(record.queueTime),\"Tc\":\(record.connectTime),"
                + "\"Tt\":\(record.totalTime),\"bytes_read\":\(record.bytesToClient),\"bytes_uploaded\":\(record.bytesFromClient),"
                + "\"termination_state\":\(quoted(record.terminationText)),\"actconn\":\(record.activeConnections),"
                + "\"retries\":\(record.retries)}\n"
        }
    }

    /// HAProxy's accept date: `05/Dec/2026:16:10:01.123`, UTC.
    static func acceptDate(_ milliseconds: Int64) -> String {
        var seconds = time_t(milliseconds / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        let millis = Int(milliseconds % 1000)
        let fraction = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
        return "\(two(parts.tm_mday))/\(months[Int(parts.tm_mon)])/\(parts.tm_year + 1900):\(two(parts.tm_hour)):"
            + "\(two(parts.tm_min)):\(two(parts.tm_sec)).\(fraction)"
    }

    static func quoted(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case _ where scalar.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Wall clock now, milliseconds since the epoch (vDSO: no system call).
    @inline(__always)
    static func wallMilliseconds() -> Int64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Int64(now.tv_sec) * 1000 + Int64(now.tv_nsec) / 1_000_000
    }
}
