// Bounded waits for async tests.

/// Polls `condition` every 10 ms until it holds, or throws after `timeout` seconds.
public func waitUntil(_ what: String, timeout: Double = 10, _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + .milliseconds(Int64(timeout * 1000))
    while !condition() {
        if ContinuousClock.now > deadline { throw FixtureFailure("timed out waiting for \(what)") }
        try await Task.sleep(for: .milliseconds(10))
    }
}
