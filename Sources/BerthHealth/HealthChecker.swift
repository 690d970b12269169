import BerthEngine
import BerthSystem
import Glibc
import Synchronization

/// One backend to check, as the router asks for it.
public struct CheckTarget: Sendable, Equatable {
    public var key: BackendKey
    public var address: SocketAddress
    public var settings: CheckSettings
    public var initialState: NewBackendState

    public init(key: BackendKey, address: SocketAddress, settings: CheckSettings, initialState: NewBackendState) {
        self.key = key
        self.address = address
        self.settings = settings
        self.initialState = initialState
    }
}

extension BackendHealth {
    /// A backend the checker has not checked yet: unchecked, or down when it starts down.
    init(starting target: CheckTarget, now: Int64) {
        self.init(status: target.initialState == .up ? .unchecked : .down, kind: target.settings.kind.description, now: now)
    }
}

/// Active health checks for every backend, on one thread with its own epoll loop (never a
/// thread per check, never a data-plane worker: a hanging check peer cannot slow traffic).
///
/// Threads: `update`, `reportFailure`, `health` and `stop` are callable from any thread;
/// `reportFailure` is what the workers' passive observation calls, so it only queues and wakes.
/// `onChange` runs on the checker thread after a backend's status changed.
public final class HealthChecker: Sendable {
    private let shared: CheckerShared
    private let thread = Mutex<pthread_t?>(nil)

    public init() throws(SystemError) {
        shared = CheckerShared(wakeup: try WakeupSignal())
        let loop = try CheckLoop(shared: shared)
        let started = OSThread(name: "berth-checks") { loop.run() }
        thread.withLock { $0 = started.handle }
    }

    /// Called after any status change (on the checker thread).
    public func onChange(_ handler: @escaping @Sendable () -> Void) {
        shared.changeHandler.withLock { $0 = handler }
    }

    /// Replaces the set of backends checked. New ones start in their `initialState`; removed
    /// ones are forgotten; kept ones keep their state.
    public func update(_ targets: [CheckTarget]) {
        let now = MonotonicClock.milliseconds()
        shared.records.withLock { records in
            var next: [BackendKey: BackendHealth] = [:]
            for target in targets {
                next[target.key] = records[target.key] ?? BackendHealth(starting: target, now: now)
            }
            records = next
        }
        shared.inbox.withLock { inbox in
            inbox.targets = targets
            inbox.changes = []
        }
        shared.wakeup.wake()
    }

    /// Changes the backends checked by the difference alone (a table applied by its changes):
    /// `removed` are forgotten; each of `targets` is added, or replaced when it differs (one
    /// given as it was keeps its state and schedule). Costs the backends named, not all.
    public func update(removing removed: [BackendKey], setting targets: [CheckTarget]) {
        guard !removed.isEmpty || !targets.isEmpty else { return }
        let now = MonotonicClock.milliseconds()
        shared.records.withLock { records in
            for key in removed { records.removeValue(forKey: key) }
            for target in targets where records[target.key] == nil { records[target.key] = BackendHealth(starting: target, now: now) }
        }
        shared.inbox.withLock { $0.changes.append((removed, targets)) }
        shared.wakeup.wake()
    }

    /// Passive observation: live traffic failed to connect to `key` repeatedly.
    public func reportFailure(_ key: BackendKey) {
        shared.inbox.withLock { $0.failures.append(key) }
        shared.wakeup.wake()
    }

    /// The health of every backend checked now.
    public func health() -> [BackendKey: BackendHealth] {
        shared.records.withLock { $0 }
    }

    public var totalChecks: UInt64 { shared.checksRun.load(ordering: .relaxed) }

    /// Ends the checker thread (in-flight checks are abandoned). Safe to call twice.
    public func stop() {
        shared.inbox.withLock { $0.stop = true }
        shared.wakeup.wake()
        let handle = thread.withLock { current -> pthread_t? in
            let taken = current
            current = nil
            return taken
        }
        if let handle { pthread_join(handle, nil) }
    }

    deinit {
        stop()
    }
}

/// What the checker's API and its loop thread share.
final class CheckerShared: Sendable {
    struct Inbox {
        var targets: [CheckTarget]?
        /// Partial updates after `targets` (or after what the loop holds), in order.
        var changes: [(removed: [BackendKey], targets: [CheckTarget])] = []
        var failures: [BackendKey] = []
        var stop = false
    }

    let wakeup: WakeupSignal
    let inbox = Mutex<Inbox>(Inbox())
    let records = Mutex<[BackendKey: BackendHealth]>([:])
    let changeHandler = Mutex<(@Sendable () -> Void)?>(nil)
    let checksRun = Atomic<UInt64>(0)

    init(wakeup: WakeupSignal) {
        self.wakeup = wakeup
    }

    func takeInbox() -> Inbox {
        wakeup.drain()
        return inbox.withLock { inbox in
            let taken = inbox
            inbox.targets = nil
            inbox.changes = []
            inbox.failures = []
            return taken
        }
    }

    /// Applies a result (or, with nil, an ejection) under the records lock; notifies outside it.
    func record(_ key: BackendKey, settings: CheckSettings, result: CheckResult?, now: Int64) {
        let changed = records.withLock { records -> Bool in
            guard var health = records[key] else { return false }
            let changed: Bool
            if let result {
                changed = health.record(result, rise: settings.rise, fall: settings.fall, now: now)
            } else {
                changed = health.eject(now: now)
            }
            records[key] = health
            return changed
        }
        if result != nil { checksRun.add(1, ordering: .relaxed) }
        if changed, let handler = changeHandler.withLock({ $0 }) { handler() }
    }
}

/// The checker's event loop (its thread only), on the shared `EventLoopCore`: one slot per
/// checked backend, whose generation changes at every check started or finished, so that a
/// late event or timer of an earlier check is dropped.
private final class CheckLoop: @unchecked Sendable {
    final class Scheduled: Slotted {
        var target: CheckTarget
        let slot: Int32
        var generation: UInt32 = 0
        var retired = false
        var probe: Probe?
        var nextRun: Int64

        var isLive: Bool { !retired }

        init(target: CheckTarget, slot: Int32, nextRun: Int64) {
            self.target = target
            self.slot = slot
            self.nextRun = nextRun
        }
    }

    /// The token kind of a probe's socket.
    static let probeToken: UInt64 = 1

    let shared: CheckerShared
    var loop: EventLoopCore
    var slots = SlotTable<Scheduled>()
    var byKey: [BackendKey: Scheduled] = [:]
    var random = SystemRandomNumberGenerator()

    init(shared: CheckerShared) throws(SystemError) {
        self.shared = shared
        loop = try EventLoopCore(capacity: 128, wakeup: shared.wakeup)
    }

    func run() {
        while true {
            let ready = (try? loop.wait()) ?? 0
            let now = MonotonicClock.milliseconds()
            for index in 0..<ready {
                let (events, token) = loop.epoll.event(at: index)
                if token == EventToken.wakeup {
                    let inbox = shared.takeInbox()
                    if inbox.stop {
                        shutdown()
                        return
                    }
                    if let targets = inbox.targets { replace(targets, now: now) }
                    for change in inbox.changes { self.change(removing: change.removed, setting: change.targets, now: now) }
                    for key in inbox.failures {
                        if let scheduled = byKey[key] { shared.record(key, settings: scheduled.target.settings, result: nil, now: now) }
                    }
                    continue
                }
                guard let scheduled = slots.lookup(token: token), let probe = scheduled.probe else { continue }
                step(scheduled, probe, now: now, events: events)
            }
            while let entry = loop.timers.popDue(now: now) {
                guard let scheduled = slots.lookup(entry) else { continue }
                if let probe = scheduled.probe {
                    // Past the connect's own limit but connected: the rest of the timeout.
                    let deadline = probe.started + scheduled.target.settings.timeout
                    if !probe.isConnecting && now < deadline {
                        arm(scheduled, at: deadline)
                        continue
                    }
                    let settings = scheduled.target.settings
                    let limit = probe.isConnecting ? min(settings.timeout, settings.interval) : settings.timeout
                    finish(scheduled, probe.timedOut(now: now, after: limit), now: now)
                } else {
                    start(scheduled, now: now)
                }
            }
        }
    }

    private func replace(_ targets: [CheckTarget], now: Int64) {
        var keep: [BackendKey: Scheduled] = [:]
        for target in targets {
            if let existing = byKey[target.key], existing.target == target {
                keep[target.key] = existing
                continue
            }
            if let existing = byKey[target.key] { retire(existing) }
            keep[target.key] = schedule(target, now: now)
        }
        for (key, scheduled) in byKey where keep[key] == nil { retire(scheduled) }
        byKey = keep
    }

    /// `HealthChecker.update(removing:setting:)` on the loop.
    private func change(removing removed: [BackendKey], setting targets: [CheckTarget], now: Int64) {
        for key in removed {
            if let scheduled = byKey.removeValue(forKey: key) { retire(scheduled) }
        }
        for target in targets {
            if let existing = byKey[target.key] {
                if existing.target == target { continue }
                retire(existing)
            }
            byKey[target.key] = schedule(target, now: now)
        }
    }

    /// A new backend's checks: the first at a random point of its first interval.
    private func schedule(_ target: CheckTarget, now: Int64) -> Scheduled {
        let spread = Int64.random(in: 0...max(0, min(target.settings.interval, 100)), using: &random)
        let scheduled = slots.take { Scheduled(target: target, slot: $0, nextRun: now + spread) }
        scheduled.target = target
        scheduled.retired = false
        scheduled.nextRun = now + spread
        arm(scheduled, at: scheduled.nextRun)
        return scheduled
    }

    private func retire(_ scheduled: Scheduled) {
        closeProbe(scheduled)
        scheduled.retired = true
        slots.release(scheduled)
    }

    private func arm(_ scheduled: Scheduled, at deadline: Int64) {
        loop.timers.insert(.init(deadline: deadline, slot: scheduled.slot, generation: scheduled.generation))
    }

    private func start(_ scheduled: Scheduled, now: Int64) {
        let probe = Probe(address: scheduled.target.address, kind: scheduled.target.settings.kind, now: now)
        scheduled.probe = probe
        scheduled.generation &+= 1
        // HAProxy's rule: a check's connect must complete within the smaller of the timeout and
        // the interval (a host that drops SYNs is found in fall × inter, not fall × timeout).
        let settings = scheduled.target.settings
        arm(scheduled, at: now + min(settings.timeout, settings.interval))
        if probe.socket.isOpen {
            do {
                try loop.epoll.add(probe.socket.raw, events: Epoll.writable, token: token(scheduled))
            } catch {
                finish(scheduled, CheckResult(succeeded: false, duration: 0, detail: "epoll: \(error)"), now: now)
                return
            }
        }
        step(scheduled, probe, now: now, events: 0)
    }

    private func step(_ scheduled: Scheduled, _ probe: Probe, now: Int64, events: UInt32) {
        switch probe.advance(now: now, events: events) {
        case .wait(let readable):
            try? loop.epoll.modify(probe.socket.raw, events: readable ? Epoll.readable : Epoll.writable, token: token(scheduled))
        case .finished(let result):
            finish(scheduled, result, now: now)
        }
    }

    private func finish(_ scheduled: Scheduled, _ result: CheckResult, now: Int64) {
        closeProbe(scheduled)
        shared.record(scheduled.target.key, settings: scheduled.target.settings, result: result, now: now)
        let settings = scheduled.target.settings
        let jitter = Int64(Double(settings.interval) * settings.jitter)
        // HAProxy's `inter`: from one check's start to the next one's. A check that ran longer
        // (a silent host, up to the timeout) is followed by the next one at once.
        let started = now - result.duration
        scheduled.nextRun = max(now, started + settings.interval + (jitter > 0 ? Int64.random(in: -jitter...jitter, using: &random) : 0))
        scheduled.generation &+= 1
        arm(scheduled, at: scheduled.nextRun)
    }

    private func closeProbe(_ scheduled: Scheduled) {
        guard let probe = scheduled.probe else { return }
        if probe.socket.isOpen { loop.epoll.remove(probe.socket.raw) }
        probe.closeSocket()
        scheduled.probe = nil
    }

    private func token(_ scheduled: Scheduled) -> UInt64 {
        EventToken.make(kind: Self.probeToken, slot: scheduled.slot, generation: scheduled.generation)
    }

    private func shutdown() {
        for scheduled in slots.live { closeProbe(scheduled) }
    }
}
