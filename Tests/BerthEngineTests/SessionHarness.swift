@testable import BerthEngine
@testable import BerthSystem
import Glibc
import XCTest

/// Scripted connects for `Worker`: every socket it gets is one end of an in-process AF_UNIX
/// stream pair (no address, no network; read, send, splice and shutdown behave as on TCP), whose
/// other end, the `Peer`, the test holds: it writes what the "client" or "backend" sends, reads
/// what the worker sent it, and closes it to make the worker's next send fail (EPIPE) as a reset
/// backend would. The test decides how each connect goes and what SO_ERROR says; the worker is
/// handed the lower fd number of a pair, so numbers are reused as the kernel reuses sockets'.
final class ScriptedSockets: SocketIO {
    final class Peer {
        let name: String
        var socket: Descriptor
        /// SO_ERROR of the worker's end, once its connect is reported.
        var pendingError: CInt = 0

        init(name: String, socket fd: CInt) {
            self.name = name
            socket = Descriptor(adopting: fd)
        }

        deinit {
            socket.close()
        }

        func send(_ bytes: [UInt8]) {
            let sent = bytes.withUnsafeBytes { Glibc.send(socket.raw, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
            precondition(sent == bytes.count, "peer send: \(sent), errno \(errno)")
        }

        /// Everything the worker has sent so far.
        func received() -> [UInt8] {
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = buffer.withUnsafeMutableBytes { recv(socket.raw, $0.baseAddress, $0.count, CInt(MSG_DONTWAIT)) }
                guard count > 0 else { return bytes }
                bytes += buffer[0..<count]
            }
        }

        func close() {
            socket.close()
        }
    }

    enum ConnectPlan {
        case connectedAtOnce
        case inProgress
        case refused
    }

    /// By the worker's fd; an entry is replaced when its fd number is handed out again.
    private(set) var peers: [CInt: Peer] = [:]
    /// Clients waiting in the listen queue: each `accept` takes one (then `wouldBlock`).
    var pendingClients = 0
    /// Runs inside the next `accept`, before it returns: another worker's turn at that moment.
    var duringAccept: (() -> Void)?
    /// The address `accept` gives for every client.
    var clientAddress: SocketAddress? = try? SocketAddress(parsing: "192.0.2.7:40000")
    /// By backend address; `.inProgress` when absent.
    var plans: [SocketAddress: ConnectPlan] = [:]
    /// The scripted calls made, in order ("connect 10.9.0.1:80 -> 12", "pendingError 12").
    private(set) var calls: [String] = []

    /// A socket pair: the worker's end (the lower number) and the test's.
    private func makePair(_ name: String) -> CInt {
        var fds: [CInt] = [-1, -1]
        let made = socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_NONBLOCK.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &fds)
        precondition(made == 0, "socketpair: errno \(errno)")
        let (mine, theirs) = fds[0] < fds[1] ? (fds[0], fds[1]) : (fds[1], fds[0])
        peers[mine] = Peer(name: name, socket: theirs)
        return mine
    }

    /// A new accepted client, for `Worker.startSession`.
    func makeClient(_ name: String = "client") -> CInt {
        makePair(name)
    }

    func peer(_ fd: CInt) -> Peer? { peers[fd] }

    func accept(_ listener: CInt, peer: inout SocketAddress?) throws(SystemError) -> IOResult<CInt> {
        calls.append("accept \(listener)")
        peer = clientAddress
        if let interleaved = duringAccept {
            duringAccept = nil
            interleaved()
        }
        guard pendingClients > 0 else { return .wouldBlock }
        pendingClients -= 1
        return .done(makeClient())
    }

    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor {
        let plan = plans[address] ?? .inProgress
        if case .refused = plan {
            calls.append("connect \(address) refused")
            throw SystemError(call: "connect", errno: ECONNREFUSED)
        }
        let fd = makePair(address.description)
        connected = plan == .connectedAtOnce
        calls.append("connect \(address) -> \(fd)")
        return Descriptor(adopting: fd)
    }

    func pendingError(_ fd: CInt) -> CInt {
        calls.append("pendingError \(fd)")
        return peers[fd]?.pendingError ?? EBADF
    }
}

/// One worker driven by hand: the test installs tables, starts sessions, delivers epoll events
/// and moves the clock; nothing runs unless the test says so.
final class SessionHarness {
    static let frontend = "web"

    let sockets = ScriptedSockets()
    let worker: Worker<ScriptedSockets>

    init(settings: FrontendSettings, shared: EngineShared = EngineShared(),
         configure: (inout EngineConfiguration) -> Void = { _ in }) throws {
        var configuration = EngineConfiguration()
        configuration.relay = .copy
        configuration.workers = 1
        configure(&configuration)
        worker = try Worker(handle: try WorkerHandle(index: 0), configuration: configuration,
                            shared: shared, io: sockets)
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
        worker.install(PublishedTable(table: RoutingTable(frontends: [frontend]), cursors: [:]), listeners: listeners.mapValues { [$0] })
    }

    /// A client accepted now; the worker starts connecting it at once.
    func accept() -> Session {
        let fd = sockets.makeClient()
        worker.startSession(client: fd, peer: sockets.clientAddress, frontend: worker.frontends.first { $0.name == Self.frontend }!)
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
        worker.frontends.first { $0.name == Self.frontend }?.backends.first { $0.backend.name == name }
    }
}
