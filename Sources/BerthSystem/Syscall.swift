import CBerthShims
import Glibc

/// A failed system call: the call's name and the errno it left.
///
/// Thrown by every wrapper in this module; `EAGAIN` never becomes one (that is `IOResult.wouldBlock`),
/// and `EINTR` is retried before anyone sees it.
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    public let call: String
    public let errno: CInt

    public init(call: String, errno: CInt) {
        self.call = call
        self.errno = errno
    }

    public var description: String {
        "\(call): \(String(cString: strerror(errno))) (errno \(errno))"
    }

    public static func == (lhs: SystemError, rhs: SystemError) -> Bool {
        lhs.call == rhs.call && lhs.errno == rhs.errno
    }
}

/// The outcome of a nonblocking call: it did something, or it would have blocked.
public enum IOResult<Value> {
    case done(Value)
    case wouldBlock
}

/// The one chokepoint every system call of the data plane goes through.
///
/// - retries `EINTR`;
/// - turns `EAGAIN`/`EWOULDBLOCK` into `.wouldBlock`;
/// - traps on `EBADF` and `EFAULT`: those mean a descriptor or pointer bug in Berth, and carrying on
///   would act on someone else's descriptor;
/// - throws everything else as a `SystemError` naming the call.
///
/// Never use it for `close` (a failed close must not be retried: the fd may already be reused).
@inlinable @inline(__always)
package func syscall<Result: FixedWidthInteger>(
    _ name: StaticString,
    _ body: () -> Result
) throws(SystemError) -> IOResult<Result> {
    while true {
        let result = body()
        if result >= 0 { return .done(result) }
        let code = Glibc.errno
        switch code {
        case EINTR:
            continue
        case EAGAIN, EWOULDBLOCK:
            return .wouldBlock
        case EBADF, EFAULT:
            fatalError("\(name) failed with errno \(code): a descriptor or pointer bug in Berth")
        default:
            throw SystemError(call: "\(name)", errno: code)
        }
    }
}

/// `syscall` for calls that cannot block (socket, bind, epoll_ctl, ...): `EAGAIN` is an error there.
@inlinable @inline(__always)
@discardableResult
package func syscallNonBlocking<Result: FixedWidthInteger>(
    _ name: StaticString,
    _ body: () -> Result
) throws(SystemError) -> Result {
    switch try syscall(name, body) {
    case .done(let value):
        return value
    case .wouldBlock:
        throw SystemError(call: "\(name)", errno: EAGAIN)
    }
}

/// Closes a raw descriptor exactly once. `close` is never retried (on Linux the fd is released
/// even when close reports EINTR); EBADF is a bug and traps.
package func closeDescriptor(_ fd: CInt) {
    if Glibc.close(fd) != 0 && Glibc.errno == EBADF {
        fatalError("close(\(fd)): EBADF, a descriptor was closed twice")
    }
}

/// Ignores SIGPIPE for the whole process: one reset peer must not kill Berth.
/// Writes also pass MSG_NOSIGNAL where the call allows it.
public func ignoreBrokenPipeSignal() {
    _ = cberth_ignore_sigpipe()
}
