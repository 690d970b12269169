import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// The latency workload's pacing: requests queued at their due time and sent on idle connections.
extension LoadGenerator {
    /// The shortest wait the pacer is set for (ns).
    static let minimumTick: UInt64 = 100_000

    /// Queues the requests whose time has come, sends as many as there are idle connections, and
    /// sets the pacer for the next one.
    func dispatchDue() {
        let now = MonotonicClock.nanoseconds()
        // After the window, only the requests due within it are still queued.
        while (!stopping || nextDue < recordUntil) && nextDue <= now && issued < issueLimit
            && due.count - dueHead < Self.latencyQueueLimit {
            due.append((nextDue, false))
            nextDue += interval
            issued += 1
        }
        while dueHead < due.count, let slot = idle.popLast() {
            let request = due[dueHead]
            dueHead += 1
            let sentAt = MonotonicClock.nanoseconds()
            let recorded = request.intended >= recordFrom && request.intended < recordUntil
            if recorded {
                if !request.waited { sendLag.record(min(sentAt &- request.intended, Self.histogramHighest)) }
                outstanding += 1
            }
            startRequest(connections[slot], at: request.waited ? request.intended : sentAt, recorded: recorded)
        }
        if dueHead == due.count {
            due.removeAll(keepingCapacity: true)
            dueHead = 0
        } else {
            // Still due: no connection was idle, so their time counts from when they were due.
            for index in dueHead..<due.count { due[index].waited = true }
        }
        if issued < issueLimit && !stopping {
            // At most one wake-up per `minimumTick`: above 10,000 req/s each tick sends the
            // requests that came due meanwhile, so that pacing does not cost the load CPU two
            // system calls per request (their lateness shows in the send lag).
            let wait = max(nextDue > now ? nextDue - now : 1, Self.minimumTick)
            // Armed already to fire in time (a response calls this too): no system call.
            if pacerFiresAt <= now || pacerFiresAt > now + wait {
                _ = cberth_timerfd_settime_ns(pacer.raw, Int64(wait))
                pacerFiresAt = now + wait
            }
        }
    }
}
