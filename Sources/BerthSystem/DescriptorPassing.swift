import CBerthShims
import Glibc

/// Descriptors received from (or about to be sent to) another process: owned here until taken.
///
/// Every error path of whoever holds a batch ends in `close()`; a batch dropped while it still
/// owns descriptors is a bug (debug builds trap, release builds close them).
public struct DescriptorBatch: ~Copyable {
    public private(set) var fds: [CInt]

    public init(adopting fds: [CInt] = []) {
        self.fds = fds
    }

    public var count: Int { fds.count }

    /// Adds descriptors this batch now owns.
    public mutating func append(contentsOf more: [CInt]) {
        fds.append(contentsOf: more)
    }

    /// Gives up ownership of the first `count` descriptors (fewer if it holds fewer).
    public mutating func take(_ count: Int) -> [CInt] {
        let taken = Array(fds.prefix(count))
        fds.removeFirst(taken.count)
        return taken
    }

    /// Closes every descriptor still owned. Safe to call again.
    public mutating func close() {
        for fd in fds { closeDescriptor(fd) }
        fds.removeAll()
    }

    deinit {
        if !fds.isEmpty {
            assertionFailure("descriptor batch \(fds) dropped while open")
            for fd in fds { closeDescriptor(fd) }
        }
    }
}

/// Blocking unix stream sockets for control-plane handoffs between two Berth processes (the
/// takeover socket): never used on a data-plane loop. Each call blocks for at most the socket's
/// timeout (`setTimeout`); a timeout is thrown as ETIMEDOUT naming the call.
public enum UnixSockets {
    /// At most this many descriptors ride on one message (the shim's buffer).
    public static let descriptorsPerMessage = Int(CBERTH_MAX_PASSED_FDS)

    /// A listening socket at `path` (mode 0600). A file already at `path` is removed first: the
    /// caller has made sure nobody answers there any more.
    public static func listen(path: String, backlog: CInt = 8) throws(SystemError) -> Descriptor {
        var socket = try makeSocket()
        do throws(SystemError) {
            unlink(path)
            let fd = socket.raw
            try withAddress(path) { address, length throws(SystemError) in
                try syscallNonBlocking("bind(unix)") { Glibc.bind(fd, address, length) }
            }
            try syscallNonBlocking("chmod(takeover socket)") { chmod(path, 0o600) }
            try syscallNonBlocking("listen(unix)") { Glibc.listen(fd, backlog) }
        } catch {
            socket.close()
            throw error
        }
        return socket
    }

    /// Connects to `path`; ENOENT or ECONNREFUSED (nobody listens) are thrown as they are.
    public static func connect(path: String, timeoutMilliseconds: Int) throws(SystemError) -> Descriptor {
        var socket = try makeSocket()
        do throws(SystemError) {
            try setTimeout(socket.raw, milliseconds: timeoutMilliseconds)
            let fd = socket.raw
            try withAddress(path) { address, length throws(SystemError) in
                try syscallNonBlocking("connect(unix)") { Glibc.connect(fd, address, length) }
            }
        } catch {
            socket.close()
            throw error
        }
        return socket
    }

    /// Waits up to `timeoutMilliseconds` for a connection on `listener`; nil when none came.
    public static func accept(_ listener: CInt, timeoutMilliseconds: Int, peerTimeoutMilliseconds: Int) throws(SystemError) -> Descriptor? {
        var entry = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        let ready = try syscallNonBlocking("poll(takeover socket)") { poll(&entry, 1, CInt(timeoutMilliseconds)) }
        if ready == 0 { return nil }
        let accepted: CInt
        switch try syscall("accept(unix)", { cberth_accept4(listener, nil, nil) }) {
        case .wouldBlock: return nil
        case .done(let fd): accepted = fd
        }
        var connection = Descriptor(adopting: accepted)
        do throws(SystemError) {
            // Accepted nonblocking: blocking, bounded by the timeouts, is what this side wants.
            try syscallNonBlocking("fcntl(F_SETFL)") { cberth_fcntl_int(accepted, F_SETFL, 0) }
            try setTimeout(connection.raw, milliseconds: peerTimeoutMilliseconds)
        } catch {
            connection.close()
            throw error
        }
        return connection
    }

    /// Send and receive timeouts of a blocking socket.
    public static func setTimeout(_ fd: CInt, milliseconds: Int) throws(SystemError) {
        var value = timeval(tv_sec: milliseconds / 1000, tv_usec: (milliseconds % 1000) * 1000)
        let size = socklen_t(MemoryLayout<timeval>.size)
        try syscallNonBlocking("setsockopt(SO_RCVTIMEO)") { setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, size) }
        try syscallNonBlocking("setsockopt(SO_SNDTIMEO)") { setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, size) }
    }

    /// Sends all of `bytes`, with `fds` (at most `descriptorsPerMessage`; still owned by the
    /// caller, the peer gets its own copies) on the first part.
    public static func send(_ fd: CInt, _ bytes: [UInt8], descriptors fds: [CInt] = []) throws(SystemError) {
        precondition(fds.count <= descriptorsPerMessage, "too many descriptors for one message")
        var offset = 0
        var attached = fds
        while offset < bytes.count || !attached.isEmpty {
            let result = try syscall("sendmsg(SCM_RIGHTS)") {
                bytes.withUnsafeBytes { buffer in
                    cberth_send_fds(fd, buffer.baseAddress! + offset, buffer.count - offset, attached, CInt(attached.count))
                }
            }
            switch result {
            case .wouldBlock: throw SystemError(call: "sendmsg(SCM_RIGHTS)", errno: ETIMEDOUT)
            case .done(let sent):
                offset += sent
                attached = []
            }
        }
    }

    /// Reads exactly `count` bytes; descriptors that arrive with them are added to `received`.
    /// End of stream before `count` bytes is ECONNRESET; more descriptors than `capacity` in
    /// all (a peer off protocol) is EPROTO (those already received stay in `received`).
    public static func receive(_ fd: CInt, count: Int, descriptors received: inout DescriptorBatch, capacity: Int) throws(SystemError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var offset = 0
        var passed = [CInt](repeating: -1, count: descriptorsPerMessage)
        while offset < count {
            var got: CInt = 0
            var truncated: CInt = 0
            let room = CInt(max(0, min(descriptorsPerMessage, capacity - received.count)))
            let result = try syscall("recvmsg(SCM_RIGHTS)") {
                bytes.withUnsafeMutableBytes { buffer in
                    cberth_receive_fds(fd, buffer.baseAddress! + offset, count - offset, &passed, room, &got, &truncated)
                }
            }
            received.append(contentsOf: Array(passed.prefix(Int(got))))
            switch result {
            case .wouldBlock: throw SystemError(call: "recvmsg(SCM_RIGHTS)", errno: ETIMEDOUT)
            case .done(0): throw SystemError(call: "recvmsg(SCM_RIGHTS)", errno: ECONNRESET)
            case .done(let read): offset += read
            }
            if truncated != 0 { throw SystemError(call: "recvmsg(SCM_RIGHTS)", errno: EPROTO) }
        }
        return bytes
    }

    /// Duplicates `fd` (close-on-exec): a copy to send while the original stays in use.
    public static func duplicate(_ fd: CInt) throws(SystemError) -> CInt {
        try syscallNonBlocking("fcntl(F_DUPFD_CLOEXEC)") { cberth_fcntl_int(fd, F_DUPFD_CLOEXEC, 0) }
    }

    private static func makeSocket() throws(SystemError) -> Descriptor {
        Descriptor(adopting: try syscallNonBlocking("socket(AF_UNIX)") {
            Glibc.socket(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CBERTH_SOCK_CLOEXEC, 0)
        })
    }

    /// Lends `path` as a `sockaddr_un`; a path too long for it is ENAMETOOLONG.
    private static func withAddress(
        _ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> Void
    ) throws(SystemError) {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity, !bytes.contains(0) else {
            throw SystemError(call: "sockaddr_un(\(path))", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        try withUnsafePointer(to: &address) { pointer throws(SystemError) in
            try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address throws(SystemError) in
                try body(address, length)
            }
        }
    }
}
