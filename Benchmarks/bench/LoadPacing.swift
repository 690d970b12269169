import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// The latency workload's pacing: requests queued at their due time and sent on idle connections.
extension LoadGenerator {
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
            let wait = nextDue > now ? nextDue - now : 1
            _ = cberth_timerfd_settime_ns(pacer.raw, Int64(wait))
        }
    }
}
