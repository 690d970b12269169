import BerthEngine
import BerthSystem

/// Where a backend stands. Pure.
public enum HealthStatus: String, Sendable, Equatable {
    /// Taking traffic; no check has run yet (`--new-backend-state up`).
    case unchecked
    case up
    case down
}

/// The state a new backend starts in until its first checks (`--new-backend-state`).
public enum NewBackendState: String, Sendable, CaseIterable {
    /// Taking traffic at once; a dead one costs a retry and is ejected by `fall` failed checks or
    /// by passive observation. The default: discovery adds backends that just started, and
    /// holding them back for rise × inter would leave a fresh service with nothing to route to.
    case up
    /// No traffic until `rise` checks passed.
    case down
}

/// What to do when every backend of a frontend is down (`--all-down`).
public enum AllDownPolicy: String, Sendable, CaseIterable {
    /// Close new clients at once (HAProxy's behaviour).
    case reject
    /// Route to all backends anyway (Envoy's panic mode).
    case tryAll = "try-all"
}

/// The outcome of one check.
public struct CheckResult: Sendable, Equatable {
    public var succeeded: Bool
    /// Milliseconds from start to result.
    public var duration: Int64
    /// Why it failed, or what it saw ("HTTP 200", "TLS handshake done").
    public var detail: String

    public init(succeeded: Bool, duration: Int64, detail: String) {
        self.succeeded = succeeded
        self.duration = duration
        self.detail = detail
    }
}

/// One backend's health, as the stats page will show it.
public struct BackendHealth: Sendable, Equatable {
    public var status: HealthStatus
    public var kind: String
    public var lastResult: CheckResult?
    /// Monotonic milliseconds of the last status change.
    public var lastChange: Int64
    public var consecutiveSuccesses = 0
    public var consecutiveFailures = 0
    public var checksDone: UInt64 = 0
    /// Times passive observation took it down.
    public var ejections: UInt64 = 0

    public init(status: HealthStatus, kind: String, now: Int64) {
        self.status = status
        self.kind = kind
        lastChange = now
    }

    public var takesTraffic: Bool { status != .down }

    /// Applies one check result with HAProxy's rise/fall rule; returns true when the status changed.
    public mutating func record(_ result: CheckResult, rise: Int, fall: Int, now: Int64) -> Bool {
        checksDone += 1
        lastResult = result
        if result.succeeded {
            consecutiveSuccesses += 1
            consecutiveFailures = 0
        } else {
            consecutiveFailures += 1
            consecutiveSuccesses = 0
        }
        let next: HealthStatus
        switch status {
        case .down:
            next = consecutiveSuccesses >= rise ? .up : .down
        case .up:
            next = consecutiveFailures >= fall ? .down : .up
        case .unchecked:
            // The first verdict: one success confirms it up; failures take it down after `fall`.
            next = result.succeeded ? .up : (consecutiveFailures >= fall ? .down : .unchecked)
        }
        return change(to: next, now: now)
    }

    /// Passive observation: live traffic failed to connect `observe-errors` times in a row. Down at
    /// once; only active checks bring it back.
    public mutating func eject(now: Int64) -> Bool {
        guard status != .down else { return false }
        ejections += 1
        consecutiveSuccesses = 0
        return change(to: .down, now: now)
    }

    private mutating func change(to next: HealthStatus, now: Int64) -> Bool {
        guard next != status else { return false }
        status = next
        lastChange = now
        return true
    }
}

/// Identifies a backend across tables: its frontend and its name.
public struct BackendKey: Hashable, Sendable, CustomStringConvertible {
    public var frontend: String
    public var backend: String

    public init(frontend: String, backend: String) {
        self.frontend = frontend
        self.backend = backend
    }

    public var description: String { "\(frontend)/\(backend)" }
}
