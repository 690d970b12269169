import Glibc

/// A mutex with one condition variable (pthreads), for control-plane threads that sleep until
/// told or until a deadline: the resolver's thread. Timed waits use the monotonic clock, so a
/// change of the wall clock neither shortens nor stretches them. (Foundation's `NSCondition`
/// would do, but Foundation, and the ICU data it links, stays out of the binary.)
///
/// Threads: any. `wait` must be called with the lock held, as with pthreads.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        precondition(pthread_mutex_init(mutex, nil) == 0 && pthread_cond_init(condition, &attributes) == 0,
                     "pthread_mutex_init or pthread_cond_init failed")
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }

    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Wakes one waiting thread.
    public func signal() { pthread_cond_signal(condition) }

    /// Releases the lock and sleeps until signalled (or woken spuriously), then takes it again.
    public func wait() { pthread_cond_wait(condition, mutex) }

    /// As `wait()`, for at most `milliseconds`. Returns false when the time ran out.
    @discardableResult
    public func wait(milliseconds: Int64) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let total = Int64(now.tv_nsec) + max(0, milliseconds) % 1_000 * 1_000_000
        var deadline = timespec(tv_sec: now.tv_sec + Int(max(0, milliseconds) / 1_000 + total / 1_000_000_000),
                                tv_nsec: Int(total % 1_000_000_000))
        return pthread_cond_timedwait(condition, mutex, &deadline) != ETIMEDOUT
    }

    /// Runs `body` with the lock held.
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}
