import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// One phase of load: a single-threaded, nonblocking, level-triggered epoll client, run on the
/// calling thread (the bench pins it to the load CPU). Use once.
///
/// Bounds: at most `workload.connectionCount` sockets; the phase ends at the end of its window
/// or after `operationCap` operations, and is abandoned after `errorLimit` errors; every loop
/// has a turn limit; reads and writes per event are bounded.
final class LoadGenerator {
    static let pacerToken = UInt64.max
    static let httpReadSize = 64 * 1024
    static let bulkReadSize = 256 * 1024
    static let readsPerEvent = 4
    static let bulkReadsPerEvent = 16
    static let loopTurnLimit = 200_000_000
    static let latencyQueueLimit = 100_000
    static let histogramHighest: UInt64 = 60_000_000_000

    let workload: Workload
    let targets: [SocketAddress]
    let limits: PhaseLimits
    let epoll: Epoll
    /// timerfd pacing the latency workload's sends.
    var pacer: Descriptor
    var connections: [LoadConnection]
    /// Slots waiting for a socket (opened at the top of the next loop turn).
    var reopen: [Int] = []
    let scratch: UnsafeMutableRawPointer
    let request: UnsafeMutableRawBufferPointer

    var measuring = false
    /// After the window: no new requests or connections.
    var stopping = false
    var operations: UInt64 = 0
    var errors: UInt64 = 0
    var lastError: String?
    var nextTarget = 0

    // The latency workload.
    var latency = Histogram<UInt64>(highestTrackableValue: LoadGenerator.histogramHighest, numberOfSignificantValueDigits: .three)
    var sendLag = Histogram<UInt64>(highestTrackableValue: LoadGenerator.histogramHighest, numberOfSignificantValueDigits: .three)
    var interval: UInt64 = 0
    /// When the pacer's timer is set to fire (ns; in the past: not armed).
    var pacerFiresAt: UInt64 = 0
    var nextDue: UInt64 = 0
    /// Requests due in [recordFrom, recordUntil) are recorded, whenever they are sent.
    var recordFrom: UInt64 = 0
    var recordUntil: UInt64 = 0
    /// Requests due and not yet sent: their intended send time, and whether they had to wait for
    /// an idle connection (then their response time counts from the intended time).
    var due: [(intended: UInt64, waited: Bool)] = []
    var dueHead = 0
    var idle: [Int] = []
    var issued: UInt64 = 0
    var issueLimit: UInt64 = 0
    /// Recorded requests whose response has not arrived.
    var outstanding = 0
    /// Requests of the latency workload that took at least `slowThreshold` ns: when their clock
    /// started (CLOCK_MONOTONIC ns), how long they took, and their connection. Written to the
    /// file named by BERTH_BENCH_SLOW_LOG (threshold BERTH_BENCH_SLOW_US, default 500 µs), so a
    /// tail can be lined up with a scheduler trace of the same run (docs/BENCHMARKS.md).
    var slowRequests: [(startedAt: UInt64, elapsed: UInt64, connection: Int)] = []
    let slowThreshold: UInt64 = SlowLog.threshold
    static let slowLogLimit = 100_000

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
        if workload.isLatency {
            drainOutstanding()
            SlowLog.append(slowRequests)
        }
        for connection in connections where connection.state != .free { close(connection) }
        return LoadOutcome(
            operations: operations, errors: errors, lastError: lastError,
            start: startSnapshot ?? endSnapshot, end: endSnapshot,
            latency: workload.recordsLatency ? latency : nil, sendLag: workload.isLatency ? sendLag : nil, capped: capped)
    }

    func waitAndHandle(timeout: CInt) throws(BenchError) {
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
    func drainOutstanding() {
        let deadline = MonotonicClock.nanoseconds() + 1_000_000_000
        for _ in 0..<10_000 where (outstanding > 0 || dueHead < due.count) && MonotonicClock.nanoseconds() < deadline {
            dispatchDue()
            try? waitAndHandle(timeout: 10)
        }
    }

    // MARK: Events

    func handle(events: UInt32, token: UInt64) {
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

    func startRequest(_ connection: LoadConnection, at startedAt: UInt64, recorded: Bool) {
        connection.state = .sending
        connection.requestOffset = 0
        connection.startedAt = startedAt
        connection.recorded = recorded
        sendRequest(connection)
    }

    func sendRequest(_ connection: LoadConnection) {
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

    func receive(_ connection: LoadConnection) {
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

    func responseComplete(_ connection: LoadConnection, status: Int) {
        if status != 200 { countError("HTTP status \(status)") }
        switch workload {
        case .keepAlive(_, let record):
            if measuring {
                operations += 1
                if record { latency.record(min(MonotonicClock.nanoseconds() &- connection.startedAt, Self.histogramHighest)) }
            }
            startRequest(connection, at: record ? MonotonicClock.nanoseconds() : 0, recorded: false)
        case .newConnections:
            connection.state = .awaitingClose
        case .latency:
            if connection.recorded {
                let elapsed = MonotonicClock.nanoseconds() &- connection.startedAt
                latency.record(min(elapsed, Self.histogramHighest))
                if elapsed >= slowThreshold && slowRequests.count < Self.slowLogLimit {
                    slowRequests.append((connection.startedAt, elapsed, connection.index))
                }
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

    func connectionDone(_ connection: LoadConnection) {
        if measuring { operations += 1 }
        close(connection)
        if !stopping { reopen.append(connection.index) }
    }

    func stream(_ connection: LoadConnection) {
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
}
