import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// The kind of load of one phase.
enum Workload {
    /// `connections` keep-alive connections, each sending the next request as soon as the
    /// previous response is complete (closed loop); with `recordLatency`, every response time
    /// is recorded too.
    case keepAlive(connections: Int, recordLatency: Bool = false)
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

    /// Whether response times are recorded (the outcome then has `latency`).
    var recordsLatency: Bool {
        switch self {
        case .latency: true
        case .keepAlive(_, let record): record
        case .newConnections, .bulk: false
        }
    }

    var connectionCount: Int {
        switch self {
        case .keepAlive(let count, _), .newConnections(let count), .latency(_, let count), .bulk(let count): count
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
final class LoadConnection {
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
