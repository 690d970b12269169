import BerthSystem

/// The calls that give a worker its sockets, as a type parameter of `Worker`: `SystemSockets` in
/// the engine, scripted ones in the tests' session harness, which drives a session's state
/// machine event by event (it decides when a connect completes and how, and which epoll events
/// arrive in which order).
///
/// Only the per-connection calls are here. The per-event ones (read, send, splice, shutdown)
/// stay direct calls to `Sockets`, inlined into the relay: the harness's sockets are in-process
/// socket pairs, on which those calls behave as on TCP, and a protocol call there cost the relay
/// a fifth more instructions per request (callgrind, keep-alive).
protocol SocketIO {
    /// Accepts a client; `peer` is set to its address (nil when unknown).
    func accept(_ listener: CInt, peer: inout SocketAddress?) throws(SystemError) -> IOResult<CInt>
    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor
    func pendingError(_ fd: CInt) -> CInt
}

/// The kernel's sockets.
struct SystemSockets: SocketIO {
    @inline(__always)
    func accept(_ listener: CInt, peer: inout SocketAddress?) throws(SystemError) -> IOResult<CInt> {
        try Sockets.accept(listener, peer: &peer)
    }

    @inline(__always)
    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor {
        try Sockets.connect(to: address, connected: &connected)
    }

    @inline(__always)
    func pendingError(_ fd: CInt) -> CInt { Sockets.pendingError(fd) }
}
