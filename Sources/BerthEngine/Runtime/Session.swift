import BerthSystem
import Glibc

/// One proxied TCP connection on one worker: a client socket, a backend socket, and the two
/// directions of bytes between them. Owned by its worker's slot table; touched only on that
/// worker's thread. Sessions are reused (the slot's generation changes every time).
final class Session {
    /// The connection's state machine; each transition is one `Worker` method.
    enum State {
        /// The slot is free.
        case free
        /// A nonblocking connect to `server` is in flight; the client is not read yet.
        case connecting
        /// Both sockets are open and bytes move (a direction may be half-closed).
        case relaying
    }

    let slot: Int32
    var generation: UInt32 = 0
    var state: State = .free

    var client = Descriptor.none
    var backend = Descriptor.none
    var clientRegistered = false

    /// The client's address, as accept4 gave it (nil when unknown).
    var peer: SocketAddress?
    /// With `sendProxy`: the address the client connected to, read once (nil: unknown).
    var destination: SocketAddress?
    var destinationKnown = false
    var frontend: FrontendRuntime?
    var server: BackendRuntime?
    /// The rotation position this connection drew, and how many connects it has tried.
    var rotation: UInt64 = 0
    var attempt = 0
    /// The candidate the balancing mode picked for the first attempt; retries go on from it.
    var firstPick = 0
    /// `balance leastconn`: the counter this session added itself to (its backend's, as it was
    /// when picked), taken off when it leaves that backend or ends.
    var load: BackendLoad?
    /// The address (port 0) of a backend whose connect timed out: a host that says nothing may
    /// be dead as a whole, so retries go to backends on other hosts while there are any.
    var silentHost: SocketAddress?

    /// client → backend.
    var request = Flow()
    /// backend → client.
    var response = Flow()
    var clientSide = Side()
    var backendSide = Side()

    var connectDeadline: Int64 = .max
    /// `retryOnResponseTimeout`: when the backend, silent since the client's first byte reached
    /// it, is given up for the next one (.max: not armed).
    var firstByteDeadline: Int64 = .max
    var drainDeadline: Int64 = .max
    /// The deadline of this session's live entry in the worker's timer heap (0: none).
    var armedDeadline: Int64 = 0
    /// Waiting in the worker's deferred list (it used up its budget with bytes still to move).
    var deferred = false

    /// `retryOnEmptyResponse`: the client's bytes so far, kept until the backend's first byte.
    var replay: UnsafeMutableRawPointer?
    var replayCount = 0
    /// The session may still be moved to another backend (nothing came back yet, and the
    /// client's bytes fit in the replay buffer).
    var replayArmed = false
    /// The backend sent its first byte.
    var responseStarted = false

    // The connection log (frontends with `logConnections`); `logs` is false otherwise, and
    // nothing below is read or written.
    var logs = false
    /// Wall clock at accept (ms since the epoch); loop time at accept and at connect.
    var acceptedWall: Int64 = 0
    var startedAt: Int64 = 0
    var connectedAt: Int64 = -1
    var bytesToClient: UInt64 = 0
    var bytesFromClient: UInt64 = 0
    /// The last connect failed by timing out (its final failure is `sC`, not `SC`).
    var lastConnectTimedOut = false
    /// How the session ended, HAProxy's two letters; set where it ends ("--": normally).
    var termination = Termination.normal

    init(slot: Int32) {
        self.slot = slot
    }

    /// Resets for reuse; descriptors must be closed and buffers released already.
    func reset() {
        precondition(!client.isOpen && !backend.isOpen)
        state = .free
        clientRegistered = false
        peer = nil
        destination = nil
        destinationKnown = false
        frontend = nil
        server = nil
        attempt = 0
        precondition(load == nil)
        silentHost = nil
        request = Flow()
        response = Flow()
        clientSide = Side()
        backendSide = Side()
        connectDeadline = .max
        firstByteDeadline = .max
        drainDeadline = .max
        armedDeadline = 0
        deferred = false
        precondition(replay == nil)
        replayCount = 0
        replayArmed = false
        responseStarted = false
        logs = false
        connectedAt = -1
        bytesToClient = 0
        bytesFromClient = 0
        lastConnectTimedOut = false
        termination = Termination.normal
    }

    /// Frees the replay buffer; the session can no longer be moved to another backend.
    func dropReplay() {
        replay?.deallocate()
        replay = nil
        replayCount = 0
        replayArmed = false
        firstByteDeadline = .max
    }

    /// When this session must next be looked at by the timer heap.
    func nextDeadline() -> Int64 {
        switch state {
        case .free:
            return .max
        case .connecting:
            return min(connectDeadline, drainDeadline)
        case .relaying:
            guard let settings = frontend?.settings else { return drainDeadline }
            return min(Deadline.idle(settings.clientTimeout, since: clientSide.lastActivity),
                       Deadline.idle(settings.serverTimeout, since: backendSide.lastActivity),
                       firstByteDeadline, drainDeadline)
        }
    }
}

/// HAProxy's termination states (the first letter: who ended it; the second: in which phase).
enum Termination {
    static let normal: (UInt8, UInt8) = (UInt8(ascii: "-"), UInt8(ascii: "-"))
    /// The client aborted (reset) while data moved.
    static let clientAborted: (UInt8, UInt8) = (UInt8(ascii: "C"), UInt8(ascii: "D"))
    /// The server aborted (reset) while data moved.
    static let serverAborted: (UInt8, UInt8) = (UInt8(ascii: "S"), UInt8(ascii: "D"))
    /// Every connect failed (refused, unreachable) or there was no backend.
    static let connectFailed: (UInt8, UInt8) = (UInt8(ascii: "S"), UInt8(ascii: "C"))
    /// The last connect timed out.
    static let connectTimedOut: (UInt8, UInt8) = (UInt8(ascii: "s"), UInt8(ascii: "C"))
    static let clientTimedOut: (UInt8, UInt8) = (UInt8(ascii: "c"), UInt8(ascii: "D"))
    static let serverTimedOut: (UInt8, UInt8) = (UInt8(ascii: "s"), UInt8(ascii: "D"))
    /// Ended by Berth: the drain deadline of a stop or a removed frontend/backend.
    static let killed: (UInt8, UInt8) = (UInt8(ascii: "K"), UInt8(ascii: "D"))
    /// A local resource ran out (descriptors, buffers, ports) while connecting.
    static let resource: (UInt8, UInt8) = (UInt8(ascii: "R"), UInt8(ascii: "C"))
}

/// Readiness of one socket as the edge-triggered epoll last reported it, cleared when a call
/// would block.
struct Side {
    var readable = false
    var writable = false
    /// The peer's FIN (EPOLLRDHUP) was seen: keep reading until 0 even after a short read.
    var peerClosed = false
    /// Loop time of the last byte read from or written to this socket.
    var lastActivity: Int64 = 0
}

/// One direction of a connection. Bytes read from the source and not yet written to the
/// destination are held either in a pooled pipe (splice) or in `held` (copy); at most one
/// chunk is held, and while it is, the source is not read (back-pressure).
struct Flow {
    var pipe: Pipe?
    var pipeBytes = 0
    var held: UnsafeMutableRawPointer?
    var heldStart = 0
    var heldEnd = 0
    /// This direction moves through a pipe (set from the relay mode, or by `auto` on a large read).
    var splicing = false
    /// The source sent its FIN (read returned 0).
    var sourceClosed = false
    /// The FIN was passed on (shutdown(SHUT_WR) of the destination).
    var finished = false

    var holdsBytes: Bool { pipeBytes > 0 || heldEnd > heldStart }
}

extension Session: Slotted {
    var isLive: Bool { state != .free }
}
