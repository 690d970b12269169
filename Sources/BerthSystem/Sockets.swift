import CBerthShims
import Glibc

/// TCP socket operations used by the data plane, each one syscall through `syscall`.
/// All sockets are created nonblocking and close-on-exec.
public enum Sockets {
    /// Opens a listening socket bound to `address`. With `reusePort`, several sockets (one per
    /// worker) may bind the same address and the kernel spreads new connections over them.
    /// On any failure the socket is closed before the error is thrown.
    public static func listen(
        on address: SocketAddress,
        reusePort: Bool,
        backlog: CInt = 4096
    ) throws(SystemError) -> Descriptor {
        var socket = Descriptor(adopting: try syscallNonBlocking("socket") {
            cberth_socket(address.family, CInt(SOCK_STREAM.rawValue), 0)
        })
        do {
            try setOption(socket.raw, SOL_SOCKET, SO_REUSEADDR, 1, name: "setsockopt(SO_REUSEADDR)")
            if reusePort {
                try setOption(socket.raw, SOL_SOCKET, SO_REUSEPORT, 1, name: "setsockopt(SO_REUSEPORT)")
            }
            if address.family == AF_INET6 {
                try setOption(socket.raw, CInt(IPPROTO_IPV6), IPV6_V6ONLY, 1, name: "setsockopt(IPV6_V6ONLY)")
            }
            let fd = socket.raw
            try syscallNonBlocking("bind") { address.withSockAddr { Glibc.bind(fd, $0, $1) } }
            try syscallNonBlocking("listen") { Glibc.listen(fd, backlog) }
        } catch {
            socket.close()
            throw error
        }
        return socket
    }

    /// Accepts one pending connection, or `.wouldBlock` when the queue is empty.
    /// EMFILE/ENFILE/ENOBUFS/ENOMEM come out as errors: the caller pauses accepting.
    @inlinable @inline(__always)
    public static func accept(_ listener: CInt) throws(SystemError) -> IOResult<CInt> {
        try syscall("accept4") { cberth_accept4(listener, nil, nil) }
    }

    /// `accept`, also giving the client's address (`peer`, set on `.done`; nil for a family
    /// other than IPv4 and IPv6). The kernel fills it in the same call: no extra system call.
    @inlinable @inline(__always)
    public static func accept(_ listener: CInt, peer: inout SocketAddress?) throws(SystemError) -> IOResult<CInt> {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = try withUnsafeMutableBytes(of: &storage) { raw throws(SystemError) -> IOResult<CInt> in
            let address = raw.baseAddress!.assumingMemoryBound(to: sockaddr.self)
            return try syscall("accept4") { cberth_accept4(listener, address, &length) }
        }
        if case .done = result { peer = SocketAddress(storage) }
        return result
    }

    /// Starts a nonblocking connect. Returns the socket and sets `connected` when it is already
    /// connected (otherwise EINPROGRESS: wait for writability, then read `pendingError`).
    /// Immediate failures (ECONNREFUSED, ENETUNREACH, ...) close the socket and throw.
    public static func connect(to address: SocketAddress, connected: inout Bool) throws(SystemError) -> Descriptor {
        var socket = Descriptor(adopting: try syscallNonBlocking("socket") {
            cberth_socket(address.family, CInt(SOCK_STREAM.rawValue), 0)
        })
        let fd = socket.raw
        while true {
            let result = address.withSockAddr { Glibc.connect(fd, $0, $1) }
            if result == 0 {
                connected = true
                return socket
            }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EINPROGRESS {
                connected = false
                return socket
            }
            socket.close()
            if code == EBADF || code == EFAULT { fatalError("connect: errno \(code), a bug") }
            throw SystemError(call: "connect", errno: code)
        }
    }

    /// The socket's pending error (SO_ERROR): 0 once a nonblocking connect succeeded.
    public static func pendingError(_ fd: CInt) -> CInt {
        var value: CInt = 0
        var length = socklen_t(MemoryLayout<CInt>.size)
        do {
            try syscallNonBlocking("getsockopt(SO_ERROR)") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) }
        } catch {
            return error.errno
        }
        return value
    }

    /// Disables Nagle's algorithm: a relay forwards what it gets as it gets it.
    @inline(__always)
    public static func setNoDelay(_ fd: CInt) {
        // A failure (a socket reset already) shows up on its next read or write.
        _ = try? setOption(fd, CInt(IPPROTO_TCP), TCP_NODELAY, 1, name: "setsockopt(TCP_NODELAY)")
    }

    public static func setOption(
        _ fd: CInt, _ level: CInt, _ option: CInt, _ value: CInt, name: StaticString
    ) throws(SystemError) {
        var value = value
        try syscallNonBlocking(name) {
            setsockopt(fd, level, option, &value, socklen_t(MemoryLayout<CInt>.size))
        }
    }

    /// The address a socket is bound to (to learn the port after binding port 0).
    public static func localAddress(_ fd: CInt) throws(SystemError) -> SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        try withUnsafeMutablePointer(to: &storage) { pointer throws(SystemError) in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address throws(SystemError) in
                _ = try syscallNonBlocking("getsockname") { getsockname(fd, address, &length) }
            }
        }
        guard let address = SocketAddress(storage) else {
            throw SystemError(call: "getsockname", errno: EAFNOSUPPORT)
        }
        return address
    }

    /// Half-closes the sending side (propagates a FIN). Errors (ENOTCONN after a reset) are ignored:
    /// the reset shows up on the next read or write.
    @inlinable @inline(__always)
    public static func shutdownWrite(_ fd: CInt) {
        _ = try? syscallNonBlocking("shutdown") { Glibc.shutdown(fd, CInt(SHUT_WR)) }
    }

    @inlinable @inline(__always)
    public static func read(_ fd: CInt, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        try syscall("read") { Glibc.read(fd, buffer, count) }
    }

    @inlinable @inline(__always)
    public static func write(_ fd: CInt, from buffer: UnsafeRawPointer, count: Int) throws(SystemError) -> IOResult<Int> {
        try syscall("send") { Glibc.send(fd, buffer, count, CInt(MSG_NOSIGNAL)) }
    }

    /// Moves up to `count` bytes between a socket and a pipe without copying them through user space.
    @inlinable @inline(__always)
    public static func splice(from source: CInt, to destination: CInt, count: Int) throws(SystemError) -> IOResult<Int> {
        try syscall("splice") {
            cberth_splice(source, destination, count, UInt32(CBERTH_SPLICE_F_MOVE | CBERTH_SPLICE_F_NONBLOCK))
        }
    }
}
