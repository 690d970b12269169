import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// The kind of load of one phase.
enum Workload {
    /// `connections` keep-alive connections, each sending the next request as soon as the
    /// previous response is complete (closed loop).
    case keepAlive(connections: Int)
    /// A new connection per request (`Connection: close`), `concurrency` of them in flight; one
    /// counts once its response is read and the server has closed.
    case newConnections(concurrency: Int)
    /// Open loop: `rate` requests per second, each sent on one of `connections` idle keep-alive
    /// connections; every response time is recorded.
    case latency(rate: Int, connections: Int)
    /// `streams` connections reading everything the bulk server sends.
    case bulk(streams: Int)

    var isLatency: Bool {
        if case .latency = self { return true }
        return false
    }

    var connectionCount: Int {
        switch self {
        case .keepAlive(let count), .newConnections(let count), .latency(_, let count), .bulk(let count): count
        }
    }
}

/// The bounds of one phase.
struct PhaseLimits {
    /// Load before the measured window, not counted (ns).
    var warmup: UInt64
    /// The measured window (ns).
    var duration: UInt64
    /// The window also ends once this many operations were counted.
    var operationCap: UInt64
    /// Errors tolerated before the phase is abandoned.
    var errorLimit: UInt64 = 10_000
}

/// What one phase measured.
struct LoadOutcome {
    /// Responses (keep-alive, latency), connections (new connections) or bytes (bulk) counted in
    /// the measured window.
    var operations: UInt64
    /// Failed connects, resets, unexpected closes, non-200 responses: the whole phase.
    var errors: UInt64
    var lastError: String?
    /// Snapshots at the edges of the measured window.
    var start: ResourceSnapshot
    var end: ResourceSnapshot
    /// Response times (ns) of the requests sent in the window (latency workload).
    var latency: Histogram<UInt64>?
    /// How late the load generator sent on-time requests (ns), a check of its own punctuality.
    var sendLag: Histogram<UInt64>?
    /// The window ended on `operationCap`, not on time.
    var capped: Bool

    var seconds: Double { Double(end.nanoseconds &- start.nanoseconds) / 1e9 }
}

/// One socket slot of the load generator: index `index` in `LoadGenerator.connections` for the
/// whole phase; `generation` changes whenever the slot gets a new socket, and is part of the
/// epoll token, so an event queued for the previous socket is dropped.
private final class LoadConnection {
    enum State {
        /// No socket.
        case free
        /// Nonblocking connect in flight (waits for writability).
        case connecting
        /// A request is partly written (waits for writability).
        case sending
        /// The request is written; reading its response.
        case receiving
        /// A `Connection: close` response was read; reading on until the server's end of file.
        case awaitingClose
        /// A keep-alive connection with no request outstanding (latency workload).
        case idle
        /// Reading a bulk stream.
        case streaming
    }

    let index: Int
    var socket = Descriptor.none
    var state = State.free
    var generation: UInt32 = 0
    /// Registered for writability (else for readability).
    var watchesWritable = false
    var requestOffset = 0
    var scanner = ResponseScanner()
    /// When the outstanding request's clock started (ns), and whether it is recorded.
    var startedAt: UInt64 = 0
    var recorded = false

    init(index: Int) {
        self.index = index
    }

    var token: UInt64 { UInt64(generation) << 32 | UInt64(index) }
}

/// One phase of load: a single-threaded, nonblocking, level-triggered epoll client, run on the
/// calling thread (the bench pins it to the load CPU). Use once.
///
/// Bounds: at most `workload.connectionCount` sockets; the phase ends at the end of its window
/// or after `operationCap` operations, and is abandoned after `errorLimit` errors; every loop
/// has a turn limit; reads and writes per event are bounded.
final class LoadGenerator {
    private static let pacerToken = UInt64.max
    private static let httpReadSize = 64 * 1024
    private static let bulkReadSize = 256 * 1024
    private static let readsPerEvent = 4
    private static let bulkReadsPerEvent = 16
    private static let loopTurnLimit = 200_000_000
    private static let latencyQueueLimit = 100_000
    private static let histogramHighest: UInt64 = 60_000_000_000

    private let workload: Workload
    private let targets: [SocketAddress]
    private let limits: PhaseLimits
    private let epoll: Epoll
    /// timerfd pacing the latency workload's sends.
    private var pacer: Descriptor
    private var connections: [LoadConnection]
    /// Slots waiting for a socket (opened at the top of the next loop turn).
    private var reopen: [Int] = []
    private let scratch: UnsafeMutableRawPointer
    private let request: UnsafeMutableRawBufferPointer

    private var measuring = false
    /// After the window: no new requests or connections.
    private var stopping = false
    private var operations: UInt64 = 0
    private var errors: UInt64 = 0
    private var lastError: String?
    private var nextTarget = 0

    // The latency workload.
    private var latency = Histogram<UInt64>(highestTrackableValue: LoadGenerator.histogramHighest, numberOfSignificantValueDigits: .three)
    private var sendLag = Histogram<UInt64>(highestTrackableValue: LoadGenerator.histogramHighest, numberOfSignificantValueDigits: .three)
    private var interval: UInt64 = 0
    private var nextDue: UInt64 = 0
    /// Requests due in [recordFrom, recordUntil) are recorded, whenever they are sent.
    private var recordFrom: UInt64 = 0
    private var recordUntil: UInt64 = 0
    /// Requests due and not yet sent: their intended send time, and whether they had to wait for
    /// an idle connection (then their response time counts from the intended time).
    private var due: [(intended: UInt64, waited: Bool)] = []
    private var dueHead = 0
    private var idle: [Int] = []
    private var issued: UInt64 = 0
    private var issueLimit: UInt64 = 0
    /// Recorded requests whose response has not arrived.
    private var outstanding = 0

    init(workload: Workload, targets: [SocketAddress], limits: PhaseLimits) throws(BenchError) {
        precondition(!targets.isEmpty && workload.connectionCount > 0)
        self.workload = workload
        self.targets = targets
        self.limits = limits
        do {
            epoll = try Epoll(capacity: 256)
        } catch {
            throw .system(error)
        }
        pacer = Descriptor(adopting: cberth_timerfd_create())
        guard pacer.isOpen else { throw .system(SystemError(call: "timerfd_create", errno: errno)) }
        do {
            try epoll.add(pacer.raw, events: Epoll.readable, token: Self.pacerToken)
        } catch {
            pacer.close()
            throw .system(error)
        }
        connections = (0..<workload.connectionCount).map { LoadConnection(index: $0) }
        scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.bulkReadSize, alignment: 64)
        let text = if case .newConnections = workload {
            "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        }
        request = UnsafeMutableRawBufferPointer.allocate(byteCount: text.utf8.count, alignment: 1)
        request.copyBytes(from: text.utf8)
    }

    deinit {
        for connection in connections where connection.state != .free { close(connection) }
        epoll.remove(pacer.raw)
        pacer.close()
        scratch.deallocate()
        request.deallocate()
    }

    /// Runs the phase. `probe` is called at both edges of the measured window.
    func run(probe: () -> ResourceSnapshot) throws(BenchError) -> LoadOutcome {
        let begin = MonotonicClock.nanoseconds()
        let windowStart = begin + limits.warmup
        let windowEnd = windowStart + limits.duration
        if case .latency(let rate, _) = workload {
            interval = max(1, 1_000_000_000 / UInt64(rate))
            nextDue = begin
            issueLimit = (limits.warmup + limits.duration) / interval
            recordFrom = windowStart
            recordUntil = windowEnd
        }
        reopen = Array((0..<connections.count).reversed())
        var startSnapshot: ResourceSnapshot?
        var capped = false
        for _ in 0..<Self.loopTurnLimit {
            let now = MonotonicClock.nanoseconds()
            if startSnapshot == nil && now >= windowStart {
                startSnapshot = probe()
                measuring = true
            }
            if measuring && now >= windowEnd { break }
            if measuring && operations >= limits.operationCap {
                capped = true
                break
            }
            if errors >= limits.errorLimit {
                throw .load("\(errors) errors, the last: \(lastError ?? "unknown")")
            }
            openPending()
            if workload.isLatency { dispatchDue() }
            let edge = measuring ? windowEnd : windowStart
            let timeout = reopen.isEmpty ? CInt(clamping: min(1_000, (edge &- now + 999_999) / 1_000_000)) : 0
            try waitAndHandle(timeout: timeout)
        }
        let endSnapshot = probe()
        measuring = false
        stopping = true
        if workload.isLatency { drainOutstanding() }
        for connection in connections where connection.state != .free { close(connection) }
        return LoadOutcome(
            operations: operations, errors: errors, lastError: lastError,
            start: startSnapshot ?? endSnapshot, end: endSnapshot,
            latency: workload.isLatency ? latency : nil, sendLag: workload.isLatency ? sendLag : nil, capped: capped)
    }

    private func waitAndHandle(timeout: CInt) throws(BenchError) {
        let count: Int
        do {
            count = try epoll.wait(timeout: timeout)
        } catch {
            throw .system(error)
        }
        for index in 0..<count {
            let (events, token) = epoll.event(at: index)
            handle(events: events, token: token)
        }
    }

    /// After the window: sends the recorded requests still queued for a connection, and waits for
    /// the responses to all recorded requests, for at most 1 s.
    private func drainOutstanding() {
        let deadline = MonotonicClock.nanoseconds() + 1_000_000_000
        for _ in 0..<10_000 where (outstanding > 0 || dueHead < due.count) && MonotonicClock.nanoseconds() < deadline {
            dispatchDue()
            try? waitAndHandle(timeout: 10)
        }
    }

    // MARK: Connections

    private func openPending() {
        guard !reopen.isEmpty && !stopping else { return }
        let batch = reopen
        reopen.removeAll(keepingCapacity: true)
        for slot in batch { open(connections[slot]) }
    }

    private func open(_ connection: LoadConnection) {
        let target = targets[nextTarget % targets.count]
        nextTarget &+= 1
        connection.generation &+= 1
        var connected = false
        do {
            connection.socket = try Sockets.connect(to: target, connected: &connected)
        } catch {
            countError("\(error)")
            reopen.append(connection.index)
            return
        }
        Sockets.setNoDelay(connection.socket.raw)
        connection.watchesWritable = !connected
        connection.state = .connecting
        do {
            try epoll.add(connection.socket.raw, events: connected ? Epoll.readable : Epoll.writable, token: connection.token)
        } catch {
            fail(connection, "\(error)")
            return
        }
        if connected { established(connection) }
    }

    private func established(_ connection: LoadConnection) {
        switch workload {
        case .bulk:
            connection.state = .streaming
            watch(connection, writable: false)
        case .latency:
            connection.state = .idle
            watch(connection, writable: false)
            idle.append(connection.index)
        case .keepAlive, .newConnections:
            startRequest(connection, at: 0, recorded: false)
        }
    }

    /// Registers the connection for writability or readability (level-triggered), if it changes.
    private func watch(_ connection: LoadConnection, writable: Bool) {
        guard connection.watchesWritable != writable else { return }
        connection.watchesWritable = writable
        do {
            try epoll.modify(connection.socket.raw, events: writable ? Epoll.writable : Epoll.readable, token: connection.token)
        } catch {
            fail(connection, "\(error)")
        }
    }

    /// Deregisters and closes the socket; the slot becomes free.
    private func close(_ connection: LoadConnection) {
        if connection.state == .idle, let position = idle.firstIndex(of: connection.index) {
            idle.remove(at: position)
        }
        epoll.remove(connection.socket.raw)
        connection.socket.close()
        connection.state = .free
        connection.watchesWritable = false
        connection.scanner = ResponseScanner()
    }

    private func fail(_ connection: LoadConnection, _ reason: String) {
        countError(reason)
        if connection.recorded && (connection.state == .sending || connection.state == .receiving) {
            connection.recorded = false
            outstanding -= 1
        }
        close(connection)
        if !stopping { reopen.append(connection.index) }
    }

    private func countError(_ reason: String) {
        errors += 1
        lastError = reason
    }

    // MARK: Events

    private func handle(events: UInt32, token: UInt64) {
        if token == Self.pacerToken {
            var expirations: UInt64 = 0
            _ = Glibc.read(pacer.raw, &expirations, 8)
            dispatchDue()
            return
        }
        let index = Int(token & 0xFFFF_FFFF)
        guard index < connections.count else { return }
        let connection = connections[index]
        guard connection.generation == UInt32(truncatingIfNeeded: token >> 32), connection.state != .free else {
            return  // stale: the slot's socket changed after this event was queued
        }
        switch connection.state {
        case .connecting:
            let error = Sockets.pendingError(connection.socket.raw)
            if error != 0 {
                fail(connection, "\(SystemError(call: "connect", errno: error))")
            } else {
                established(connection)
            }
        case .sending:
            sendRequest(connection)
        case .receiving, .awaitingClose, .idle:
            receive(connection)
        case .streaming:
            stream(connection)
        case .free:
            break
        }
    }

    private func startRequest(_ connection: LoadConnection, at startedAt: UInt64, recorded: Bool) {
        connection.state = .sending
        connection.requestOffset = 0
        connection.startedAt = startedAt
        connection.recorded = recorded
        sendRequest(connection)
    }

    private func sendRequest(_ connection: LoadConnection) {
        while connection.requestOffset < request.count {
            let offset = connection.requestOffset
            do {
                switch try Sockets.write(connection.socket.raw, from: request.baseAddress! + offset, count: request.count - offset) {
                case .done(let written):
                    connection.requestOffset += written
                case .wouldBlock:
                    watch(connection, writable: true)
                    return
                }
            } catch {
                fail(connection, "\(error)")
                return
            }
        }
        connection.state = .receiving
        watch(connection, writable: false)
    }

    private func receive(_ connection: LoadConnection) {
        for _ in 0..<Self.readsPerEvent {
            let result: IOResult<Int>
            do {
                result = try Sockets.read(connection.socket.raw, into: scratch, count: Self.httpReadSize)
            } catch {
                fail(connection, "\(error)")
                return
            }
            guard case .done(let count) = result else { return }
            if count == 0 {
                if connection.state == .awaitingClose {
                    connectionDone(connection)
                } else {
                    fail(connection, "the server closed the connection")
                }
                return
            }
            let bytes = UnsafeRawBufferPointer(start: scratch, count: count)
            var offset = 0
            while offset < count && connection.state == .receiving {
                let (next, step) = connection.scanner.scan(bytes, from: offset)
                offset = next
                switch step {
                case .needMore:
                    break
                case .malformed:
                    fail(connection, "malformed response")
                    return
                case .complete(let status):
                    responseComplete(connection, status: status)
                }
            }
            if connection.state == .free { return }
            if connection.state == .idle && offset < count {
                fail(connection, "bytes after the response")
                return
            }
            // A short read drained the socket; but a closing connection is read on to its end.
            if count < Self.httpReadSize && connection.state != .awaitingClose { return }
        }
    }

    private func responseComplete(_ connection: LoadConnection, status: Int) {
        if status != 200 { countError("HTTP status \(status)") }
        switch workload {
        case .keepAlive:
            if measuring { operations += 1 }
            startRequest(connection, at: 0, recorded: false)
        case .newConnections:
            connection.state = .awaitingClose
        case .latency:
            if connection.recorded {
                let elapsed = MonotonicClock.nanoseconds() &- connection.startedAt
                latency.record(min(elapsed, Self.histogramHighest))
                operations += 1
                outstanding -= 1
                connection.recorded = false
            }
            connection.state = .idle
            idle.append(connection.index)
            dispatchDue()
        case .bulk:
            break
        }
    }

    private func connectionDone(_ connection: LoadConnection) {
        if measuring { operations += 1 }
        close(connection)
        if !stopping { reopen.append(connection.index) }
    }

    private func stream(_ connection: LoadConnection) {
        for _ in 0..<Self.bulkReadsPerEvent {
            do {
                switch try Sockets.read(connection.socket.raw, into: scratch, count: Self.bulkReadSize) {
                case .done(0):
                    fail(connection, "the bulk stream ended")
                    return
                case .done(let count):
                    if measuring { operations += UInt64(count) }
                case .wouldBlock:
                    return
                }
            } catch {
                fail(connection, "\(error)")
                return
            }
        }
    }

    // MARK: Pacing (latency workload)

    /// Queues the requests whose time has come, sends as many as there are idle connections, and
    /// sets the pacer for the next one.
    private func dispatchDue() {
        let now = MonotonicClock.nanoseconds()
        // After the window, only the requests due within it are still queued.
        while (!stopping || nextDue < recordUntil) && nextDue <= now && issued < issueLimit
            && due.count - dueHead < Self.latencyQueueLimit {
            due.append((nextDue, false))
            nextDue += interval
            issued += 1
        }
        while dueHead < due.count, let slot = idle.popLast() {
            let request = due[dueHead]
            dueHead += 1
            let sentAt = MonotonicClock.nanoseconds()
            let recorded = request.intended >= recordFrom && request.intended < recordUntil
            if recorded {
                if !request.waited { sendLag.record(min(sentAt &- request.intended, Self.histogramHighest)) }
                outstanding += 1
            }
            startRequest(connections[slot], at: request.waited ? request.intended : sentAt, recorded: recorded)
        }
        if dueHead == due.count {
            due.removeAll(keepingCapacity: true)
            dueHead = 0
        } else {
            // Still due: no connection was idle, so their time counts from when they were due.
            for index in dueHead..<due.count { due[index].waited = true }
        }
        if issued < issueLimit && !stopping {
            let wait = nextDue > now ? nextDue - now : 1
            _ = cberth_timerfd_settime_ns(pacer.raw, Int64(wait))
        }
    }
}
