import BerthSystem
import Glibc
import Histogram

/// Something the failover load does at a set time of its run (kill a backend, restart it), on
/// the load generator's thread, between two turns of its loop.
struct TimedAction {
    /// Nanoseconds after the load starts.
    var offset: UInt64
    var perform: () -> Void
}

/// What the failover load saw.
struct FailoverOutcome {
    /// Requests answered `200` with a whoami body.
    var completed: UInt64 = 0
    /// Requests that failed (connect error, reset, empty or non-200 answer, no answer by the end).
    var failed: UInt64 = 0
    var failureReasons: [String: UInt64] = [:]
    /// Answers per backend (the name in the whoami body).
    var answers: [String: UInt64] = [:]
    /// When (monotonic ns) the watched backend answered (the first `answerTimeLimit`).
    var watchedAnswers: [UInt64] = []
    /// When each action had been performed (monotonic ns, after it returned).
    var actionTimes: [UInt64] = []
    /// Samples of the sampled counter in the sampling window: (monotonic ns, value).
    var samples: [(time: UInt64, value: UInt64)] = []
    /// Request times (connect to the server's close), ns.
    var latency = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    var start: UInt64 = 0
    var seconds: Double = 0
}

/// The failover scenario's load: one request per new connection (`Connection: close`),
/// `concurrency` in flight, each read to the server's end of file and judged whole: `200` and a
/// body `I'm NAME` (the backend that answered) or a failure. Single-threaded, nonblocking,
/// level-triggered epoll, on the calling thread. Use once.
///
/// Bounds: `concurrency` sockets; 4 KiB per response; the run ends after `duration` (or
/// `failureLimit` failures), then waits at most `drainLimit` for the requests in flight (those
/// still open then count as failed); every loop has a turn limit.
final class FailoverLoad {
    private final class Slot {
        enum State {
            /// No socket.
            case free
            /// Nonblocking connect in flight.
            case connecting
            /// Writing the request.
            case sending
            /// Reading the response, to the server's end of file.
            case receiving
        }

        let index: Int
        var socket = Descriptor.none
        var state = State.free
        var generation: UInt32 = 0
        var watchesWritable = false
        var sent = 0
        var response: [UInt8] = []
        var startedAt: UInt64 = 0

        init(index: Int) {
            self.index = index
        }

        var token: UInt64 { UInt64(generation) << 32 | UInt64(index) }
    }

    static let responseLimit = 4_096
    static let readsPerEvent = 4
    static let loopTurnLimit = 100_000_000
    static let drainLimit: UInt64 = 3_000_000_000
    static let sampleInterval: UInt64 = 1_000_000
    static let sampleLimit = 20_000
    static let answerTimeLimit = 1_000_000
    /// Failures after which the run is cut short (the proxy is gone, say).
    static let failureLimit: UInt64 = 100_000

    private let target: SocketAddress
    private let duration: UInt64
    private let watched: String
    private let epoll: Epoll
    private var slots: [Slot]
    private var reopen: [Int] = []
    private let scratch: UnsafeMutableRawPointer
    private let request: UnsafeMutableRawBufferPointer
    private var stopping = false
    private var outcome = FailoverOutcome()

    /// `watched`: the backend whose answer times are kept.
    init(target: SocketAddress, concurrency: Int, duration: UInt64, watched: String) throws(BenchError) {
        precondition(concurrency > 0)
        self.target = target
        self.duration = duration
        self.watched = watched
        do {
            epoll = try Epoll(capacity: 256)
        } catch {
            throw .system(error)
        }
        slots = (0..<concurrency).map { Slot(index: $0) }
        scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.responseLimit, alignment: 64)
        let text = "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        request = UnsafeMutableRawBufferPointer.allocate(byteCount: text.utf8.count, alignment: 1)
        request.copyBytes(from: text.utf8)
    }

    deinit {
        for slot in slots where slot.state != .free { close(slot) }
        scratch.deallocate()
        request.deallocate()
    }

    /// Runs the load. `sampleWindow` (offsets in ns) is when `sample` is read, about every ms.
    func run(actions: [TimedAction], sampleWindow: Range<UInt64>, sample: () -> UInt64?) -> FailoverOutcome {
        let begin = MonotonicClock.nanoseconds()
        outcome.start = begin
        let end = begin + duration
        var nextAction = 0
        var lastSample: UInt64 = 0
        reopen = Array((0..<slots.count).reversed())
        for _ in 0..<Self.loopTurnLimit {
            var now = MonotonicClock.nanoseconds()
            while nextAction < actions.count && now >= begin + actions[nextAction].offset {
                actions[nextAction].perform()
                now = MonotonicClock.nanoseconds()
                outcome.actionTimes.append(now)
                nextAction += 1
            }
            let sampling = sampleWindow.contains(now - begin)
            if sampling && now - lastSample >= Self.sampleInterval && outcome.samples.count < Self.sampleLimit {
                if let value = sample() { outcome.samples.append((now, value)) }
                lastSample = now
            }
            if now >= end || outcome.failed >= Self.failureLimit { break }
            openPending()
            let nextEdge = nextAction < actions.count ? min(end, begin + actions[nextAction].offset) : end
            let timeout: CInt = !reopen.isEmpty ? 0 : sampling ? 1 : CInt(clamping: min(10, (nextEdge &- now) / 1_000_000 + 1))
            waitAndHandle(timeout: timeout)
        }
        outcome.seconds = Double(MonotonicClock.nanoseconds() - begin) / 1e9
        stopping = true
        let deadline = MonotonicClock.nanoseconds() + Self.drainLimit
        for _ in 0..<100_000 where slots.contains(where: { $0.state != .free }) && MonotonicClock.nanoseconds() < deadline {
            waitAndHandle(timeout: 10)
        }
        for slot in slots where slot.state != .free {
            fail(slot, "no answer \(Self.drainLimit / 1_000_000_000) s after the end of the run")
        }
        return outcome
    }

    private func waitAndHandle(timeout: CInt) {
        let count = (try? epoll.wait(timeout: timeout)) ?? 0
        for index in 0..<count {
            let (_, token) = epoll.event(at: index)
            let slotIndex = Int(token & 0xFFFF_FFFF)
            guard slotIndex < slots.count else { continue }
            let slot = slots[slotIndex]
            guard slot.generation == UInt32(truncatingIfNeeded: token >> 32), slot.state != .free else { continue }
            switch slot.state {
            case .connecting:
                let error = Sockets.pendingError(slot.socket.raw)
                if error != 0 {
                    fail(slot, "\(SystemError(call: "connect", errno: error))")
                } else {
                    send(slot)
                }
            case .sending: send(slot)
            case .receiving: receive(slot)
            case .free: break
            }
        }
    }

    private func openPending() {
        guard !reopen.isEmpty && !stopping else { return }
        let batch = reopen
        reopen.removeAll(keepingCapacity: true)
        for index in batch { open(slots[index]) }
    }

    private func open(_ slot: Slot) {
        slot.generation &+= 1
        slot.startedAt = MonotonicClock.nanoseconds()
        slot.sent = 0
        slot.response.removeAll(keepingCapacity: true)
        var connected = false
        do {
            slot.socket = try Sockets.connect(to: target, connected: &connected)
        } catch {
            record(failure: "\(error)")
            reopen.append(slot.index)
            return
        }
        slot.state = connected ? .sending : .connecting
        slot.watchesWritable = true
        do {
            try epoll.add(slot.socket.raw, events: Epoll.writable, token: slot.token)
        } catch {
            fail(slot, "\(error)")
            return
        }
        if connected { send(slot) }
    }

    private func send(_ slot: Slot) {
        slot.state = .sending
        while slot.sent < request.count {
            do {
                switch try Sockets.write(slot.socket.raw, from: request.baseAddress! + slot.sent, count: request.count - slot.sent) {
                case .done(let count): slot.sent += count
                case .wouldBlock: return
                }
            } catch {
                fail(slot, "\(error)")
                return
            }
        }
        slot.state = .receiving
        slot.watchesWritable = false
        do {
            try epoll.modify(slot.socket.raw, events: Epoll.readable, token: slot.token)
        } catch {
            fail(slot, "\(error)")
        }
    }

    private func receive(_ slot: Slot) {
        for _ in 0..<Self.readsPerEvent {
            let result: IOResult<Int>
            do {
                result = try Sockets.read(slot.socket.raw, into: scratch, count: Self.responseLimit)
            } catch {
                fail(slot, slot.response.isEmpty ? "\(error) before any byte" : "\(error) after \(slot.response.count) bytes")
                return
            }
            guard case .done(let count) = result else { return }
            if count == 0 {
                judge(slot)
                return
            }
            guard slot.response.count + count <= Self.responseLimit else {
                fail(slot, "a response over \(Self.responseLimit) bytes")
                return
            }
            slot.response.append(contentsOf: UnsafeRawBufferPointer(start: scratch, count: count))
        }
    }

    /// The server closed: a `200` with a whoami body is an answer, anything else a failure.
    private func judge(_ slot: Slot) {
        let bytes = slot.response
        guard !bytes.isEmpty else {
            fail(slot, "closed without an answer (empty response)")
            return
        }
        let lineEnd = bytes.firstIndex(of: UInt8(ascii: "\r")) ?? bytes.count
        let statusLine = String(decoding: bytes[..<lineEnd].prefix(60), as: UTF8.self)
        let words = statusLine.split(separator: " ")
        guard words.count >= 2, words[0].hasPrefix("HTTP/1."), words[1] == "200" else {
            fail(slot, "answer \"\(statusLine)\"")
            return
        }
        let separator: [UInt8] = [13, 10, 13, 10]
        guard let headEnd = bytes.indices.dropLast(3).first(where: { bytes[$0..<$0 + 4].elementsEqual(separator) }) else {
            fail(slot, "closed inside the response head")
            return
        }
        let body = bytes[(headEnd + 4)...]
        guard body.starts(with: Array("I'm ".utf8)) else {
            fail(slot, "a body that is not whoami's")
            return
        }
        let name = String(decoding: body.dropFirst(4).prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        let now = MonotonicClock.nanoseconds()
        outcome.completed += 1
        outcome.answers[name, default: 0] += 1
        if name == watched && outcome.watchedAnswers.count < Self.answerTimeLimit { outcome.watchedAnswers.append(now) }
        outcome.latency.record(min(now &- slot.startedAt, 60_000_000_000))
        close(slot)
        if !stopping { reopen.append(slot.index) }
    }

    private func fail(_ slot: Slot, _ reason: String) {
        record(failure: reason)
        close(slot)
        if !stopping { reopen.append(slot.index) }
    }

    private func record(failure reason: String) {
        outcome.failed += 1
        outcome.failureReasons[reason, default: 0] += 1
    }

    private func close(_ slot: Slot) {
        epoll.remove(slot.socket.raw)
        slot.socket.close()
        slot.state = .free
    }
}
