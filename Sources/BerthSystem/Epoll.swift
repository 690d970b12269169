import CBerthShims
import Glibc

/// One epoll instance and its event buffer. Owned by one event loop thread.
///
/// Registration data is a 64-bit token (see `EventToken`), never an object pointer, so an event
/// that arrives for an fd that was closed and reused is recognised as stale and dropped.
public struct Epoll: ~Copyable {
    public static let readable = CBERTH_EPOLLIN
    public static let writable = CBERTH_EPOLLOUT
    public static let error = CBERTH_EPOLLERR
    public static let hangup = CBERTH_EPOLLHUP
    public static let readHangup = CBERTH_EPOLLRDHUP
    public static let edgeTriggered = CBERTH_EPOLLET

    /// The epoll fd, owned (closed in deinit).
    private let epfd: CInt
    /// The kernel fills it, the shims read it, both with C's (packed) layout; it is bound to
    /// `epoll_event` once, over enough bytes for either layout.
    private let events: UnsafeMutablePointer<epoll_event>
    /// Bound on events taken per `wait`.
    public let capacity: Int

    public init(capacity: Int = 256) throws(SystemError) {
        epfd = try syscallNonBlocking("epoll_create1") { cberth_epoll_create() }
        self.capacity = capacity
        let size = max(cberth_epoll_event_size(), MemoryLayout<epoll_event>.stride)
        events = UnsafeMutableRawPointer.allocate(byteCount: capacity * size, alignment: 8)
            .bindMemory(to: epoll_event.self, capacity: capacity)
    }

    deinit {
        UnsafeMutableRawPointer(events).deallocate()
        closeDescriptor(epfd)
    }

    public func add(_ fd: CInt, events mask: UInt32, token: UInt64) throws(SystemError) {
        try syscallNonBlocking("epoll_ctl(ADD)") { cberth_epoll_ctl(epfd, EPOLL_CTL_ADD, fd, mask, token) }
    }

    public func modify(_ fd: CInt, events mask: UInt32, token: UInt64) throws(SystemError) {
        try syscallNonBlocking("epoll_ctl(MOD)") { cberth_epoll_ctl(epfd, EPOLL_CTL_MOD, fd, mask, token) }
    }

    /// Deregisters `fd`; called before the fd is closed. ENOENT (never registered) is ignored.
    public func remove(_ fd: CInt) {
        _ = try? syscallNonBlocking("epoll_ctl(DEL)") { cberth_epoll_ctl(epfd, EPOLL_CTL_DEL, fd, 0, 0) }
    }

    /// Waits up to `timeout` ms (-1: forever) and returns how many events are ready.
    public func wait(timeout: CInt) throws(SystemError) -> Int {
        let buffer = events
        let capacity = CInt(self.capacity)
        switch try syscall("epoll_wait", { cberth_epoll_wait(epfd, buffer, capacity, timeout) }) {
        case .done(let count): return Int(count)
        case .wouldBlock: return 0
        }
    }

    @inline(__always)
    public func event(at index: Int) -> (events: UInt32, token: UInt64) {
        let buffer = UnsafePointer(events)
        return (cberth_epoll_event_events(buffer, CInt(index)), cberth_epoll_event_data(buffer, CInt(index)))
    }
}

/// An eventfd used to wake an event loop from another thread. `wake` may be called from any
/// thread; `drain` only by the loop that polls it.
public final class WakeupSignal: Sendable {
    public let fd: CInt

    public init() throws(SystemError) {
        fd = try syscallNonBlocking("eventfd") { cberth_eventfd() }
    }

    deinit {
        closeDescriptor(fd)
    }

    /// EAGAIN (the counter is at its maximum) means a wake-up is pending already.
    public func wake() {
        var one: UInt64 = 1
        _ = try? syscall("write(eventfd)") { Glibc.write(fd, &one, 8) }
    }

    /// EAGAIN: nothing was pending.
    public func drain() {
        var value: UInt64 = 0
        _ = try? syscall("read(eventfd)") { Glibc.read(fd, &value, 8) }
    }
}
