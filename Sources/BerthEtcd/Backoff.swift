/// Capped exponential backoff with jitter, for reconnecting to etcd (and Docker).
///
/// Each failure doubles the base delay from `initial` up to `maximum`; the delay slept is drawn
/// uniformly from [base/2, base] so that many clients cut off together do not return together.
public struct Backoff: Sendable {
    public struct Settings: Sendable, Equatable {
        public var initial: Duration = .milliseconds(50)
        public var maximum: Duration = .seconds(3)
        public init(initial: Duration = .milliseconds(50), maximum: Duration = .seconds(3)) {
            self.initial = initial
            self.maximum = maximum
        }
    }

    public let settings: Settings
    private var base: Duration
    public private(set) var failures = 0

    public init(_ settings: Settings = Settings()) {
        self.settings = settings
        self.base = settings.initial
    }

    /// The next delay to wait; grows the base for the one after.
    public mutating func nextDelay() -> Duration {
        failures += 1
        let current = base
        base = min(base * 2, settings.maximum)
        let milliseconds = max(1, Int64(current / .milliseconds(1)))
        return .milliseconds(Int64.random(in: (milliseconds / 2)...milliseconds))
    }

    /// Sleeps the next delay (throws CancellationError when the task is cancelled).
    public mutating func wait() async throws {
        try await Task.sleep(for: nextDelay())
    }

    /// After a success: the next failure waits `initial` again.
    public mutating func reset() {
        base = settings.initial
        failures = 0
    }
}
