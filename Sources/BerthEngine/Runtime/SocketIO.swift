import BerthSystem

/// The socket calls a worker's sessions make, as a type parameter of `Worker`: `SystemSockets`
/// in the engine (each call one system call through BerthSystem's chokepoint, specialised and
/// inlined away), a scripted implementation in the tests' session harness, which drives a
/// session's state machine event by event without real sockets.
///
/// Epoll registration is not part of it: the harness's "sockets" are eventfds, which a real
/// epoll instance accepts, and it feeds the events itself.
protocol SocketIO {
    func accept(_ listener: CInt) throws(SystemError) -> IOResult<CInt>
    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor
    func pendingError(_ fd: CInt) -> CInt
    func read(_ fd: CInt, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> IOResult<Int>
    func write(_ fd: CInt, from buffer: UnsafeRawPointer, count: Int) throws(SystemError) -> IOResult<Int>
    func splice(from source: CInt, to destination: CInt, count: Int) throws(SystemError) -> IOResult<Int>
    func shutdownWrite(_ fd: CInt)
    func setNoDelay(_ fd: CInt)
}

/// The kernel's sockets.
struct SystemSockets: SocketIO {
    @inline(__always)
    func accept(_ listener: CInt) throws(SystemError) -> IOResult<CInt> { try Sockets.accept(listener) }

    @inline(__always)
    func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor {
        try Sockets.connect(to: address, connected: &connected)
    }

    @inline(__always)
    func pendingError(_ fd: CInt) -> CInt { Sockets.pendingError(fd) }

    @inline(__always)
    func read(_ fd: CInt, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        try Sockets.read(fd, into: buffer, count: count)
    }

    @inline(__always)
    func write(_ fd: CInt, from buffer: UnsafeRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        try Sockets.write(fd, from: buffer, count: count)
    }

    @inline(__always)
    func splice(from source: CInt, to destination: CInt, count: Int) throws(SystemError) -> IOResult<Int> {
        try Sockets.splice(from: source, to: destination, count: count)
    }

    @inline(__always)
    func shutdownWrite(_ fd: CInt) { Sockets.shutdownWrite(fd) }

    @inline(__always)
    func setNoDelay(_ fd: CInt) { Sockets.setNoDelay(fd) }
}
