@testable import BerthEngine
@testable import BerthSystem
import CBerthShims
import Glibc
import XCTest

/// Scripted sockets for `Worker`: each "socket" is an eventfd (a real descriptor that a real
/// epoll accepts and `close` releases, so fd numbers are reused as the kernel reuses them), and
/// what reading, writing and connecting it does is set by the test. No byte leaves the process.
final class ScriptedSockets: SocketIO {
    final class Socket {
        let name: String
        /// What the next reads return; empty: `wouldBlock`, or 0 once `peerClosed`.
        var incoming: [UInt8] = []
        var peerClosed = false
        /// Reads and writes fail with this errno (a reset peer: ECONNRESET).
        var failure: CInt?
        var written: [UInt8] = []
        /// SO_ERROR once the connect is reported.
        var pendingError: CInt = 0
        var shutdownWritten = false

        init(name: String) {
            self.name = name
        }
    }

    enum ConnectPlan {
        case connectedAtOnce
        case inProgress
        case refused
    }

    /// By fd; an entry is replaced when its fd number is handed out again.
    private(set) var sockets: [CInt: Socket] = [:]
    /// By backend address; `.inProgress` when absent.
    var plans: [SocketAddress: ConnectPlan] = [:]
    /// Every call made, in order ("connect 10.9.0.1:80 -> 12", "pendingError 12", ...).
    private(set) var calls: [String] = []

    /// A new accepted client, for `Worker.startSession`.
    func makeClient(_ name: String = "client") -> CInt {
        let fd = cberth_eventfd()
        precondition(fd >= 0, "eventfd: errno \(errno)")
        sockets[fd] = Socket(name: name)
        return fd
    }

    func socket(_ fd: CInt) -> Socket? { sockets[fd] }

    func accept(_ listener: CInt) throws(SystemError) -> IOResult<CInt> {
        calls.append("accept \(listener)")
        return .wouldBlock
    }

    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor {
        let plan = plans[address] ?? .inProgress
        if case .refused = plan {
            calls.append("connect \(address) refused")
            throw SystemError(call: "connect", errno: ECONNREFUSED)
        }
        let fd = cberth_eventfd()
        precondition(fd >= 0, "eventfd: errno \(errno)")
        sockets[fd] = Socket(name: address.description)
        connected = plan == .connectedAtOnce
        calls.append("connect \(address) -> \(fd)")
        return Descriptor(adopting: fd)
    }

    func pendingError(_ fd: CInt) -> CInt {
        calls.append("pendingError \(fd)")
        return sockets[fd]?.pendingError ?? EBADF
    }

    func read(_ fd: CInt, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        calls.append("read \(fd)")
        guard let socket = sockets[fd] else { throw SystemError(call: "read", errno: EBADF) }
        if let failure = socket.failure { throw SystemError(call: "read", errno: failure) }
        if socket.incoming.isEmpty { return socket.peerClosed ? .done(0) : .wouldBlock }
        let taken = min(count, socket.incoming.count)
        socket.incoming.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: taken) }
        socket.incoming.removeFirst(taken)
        return .done(taken)
    }

    func write(_ fd: CInt, from buffer: UnsafeRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        calls.append("write \(fd)")
        guard let socket = sockets[fd] else { throw SystemError(call: "send", errno: EBADF) }
        if let failure = socket.failure { throw SystemError(call: "send", errno: failure) }
        socket.written.append(contentsOf: UnsafeRawBufferPointer(start: buffer, count: count))
        return .done(count)
    }

    func splice(from source: CInt, to destination: CInt, count: Int) throws(SystemError) -> IOResult<Int> {
        throw SystemError(call: "splice", errno: EINVAL)  // the harness runs the copy path
    }

    func shutdownWrite(_ fd: CInt) {
        calls.append("shutdown \(fd)")
        sockets[fd]?.shutdownWritten = true
    }

    func setNoDelay(_ fd: CInt) {}
}

/// One worker driven by hand: the test installs tables, starts sessions, delivers epoll events
/// and moves the clock; nothing runs unless the test says so.
final class SessionHarness {
    static let frontend = "web"

    let sockets = ScriptedSockets()
    let worker: Worker<ScriptedSockets>

    init(settings: FrontendSettings, configure: (inout EngineConfiguration) -> Void = { _ in }) throws {
        var configuration = EngineConfiguration()
        configuration.relay = .copy
        configuration.workers = 1
        configure(&configuration)
        worker = try Worker(handle: try WorkerHandle(index: 0), configuration: configuration,
                            shared: EngineShared(), io: sockets)
        worker.now = 1_000
        self.settings = settings
    }

    private let settings: FrontendSettings

    static func address(_ last: UInt8, port: UInt16 = 80) -> SocketAddress {
        SocketAddress(ipv4: (10, 9, 0, last), port: port)
    }

    /// Installs a table with one frontend and these backends (name, address), no listener.
    func install(_ backends: [(String, SocketAddress)], listeners: [String: CInt] = [:]) {
        let frontend = Frontend(name: Self.frontend, listen: Self.address(0, port: 8080),
                                backends: backends.map { Backend(name: $0.0, address: $0.1) }, settings: settings)
        worker.install(PublishedTable(table: RoutingTable(frontends: [frontend]), cursors: [:]), listeners: listeners)
    }

    /// A client accepted now; the worker starts connecting it at once.
    func accept() -> Session {
        let fd = sockets.makeClient()
        worker.startSession(client: fd, frontend: worker.frontends[Self.frontend]!)
        return worker.sessions.elements.first { $0.client.raw == fd }!
    }

    /// One epoll event for a session's socket, with the generation it was registered under.
    func deliver(_ events: UInt32, to session: Session, backend: Bool, generation: UInt32) {
        let kind = backend ? WorkerToken.backend : WorkerToken.client
        worker.dispatch(events: events, token: EventToken.make(kind: kind, slot: session.slot, generation: generation))
    }

    /// Moves the loop's clock and runs what a loop round runs after its events (timers).
    func advance(to now: Int64) {
        worker.now = now
        worker.afterEvents()
    }

    func backendRuntime(_ name: String) -> BackendRuntime? {
        worker.frontends[Self.frontend]?.backends.first { $0.backend.name == name }
    }
}
