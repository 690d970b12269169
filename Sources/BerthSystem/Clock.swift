import Glibc

/// Monotonic milliseconds, the unit of every deadline on an event loop.
public enum MonotonicClock {
    @inline(__always)
    public static func milliseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }

    @inline(__always)
    public static func nanoseconds() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }
}

/// Deadlines on the monotonic millisecond clock. Saturating: a deadline past the end of time is
/// `.max` ("never"), never a wrapped negative number that would fire at once.
public enum Deadline {
    @inline(__always)
    public static func after(_ milliseconds: Int64, from now: Int64) -> Int64 {
        let (sum, overflow) = now.addingReportingOverflow(milliseconds)
        return overflow ? .max : sum
    }

    /// An idle timeout's deadline: 0 means no timeout (HAProxy's reading of `timeout client 0`).
    @inline(__always)
    public static func idle(_ timeout: Int64, since lastActivity: Int64) -> Int64 {
        timeout > 0 ? after(timeout, from: lastActivity) : .max
    }
}
