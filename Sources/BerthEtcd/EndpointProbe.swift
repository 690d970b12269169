import NIOCore
import NIOPosix
import Synchronization

/// Seeing an etcd endpoint come back at once after a network cut.
///
/// A host cut off from etcd (or an etcd host that died) drops packets: nothing refuses. A gRPC
/// connect started during the cut waits on SYN retransmissions (1 s, 3 s, 7 s after it began)
/// and its transport's 10 s connect timeout, then the reconnect backoff: seconds after the cut
/// heals before the watch is back. So while a watch is not established, the client probes the
/// endpoint with a plain TCP connect of its own (`probeTimeout`, every `probeInterval`); when a
/// probe connects after one failed, the endpoint has just come back, and the stuck attempt (or
/// the backoff sleep) is abandoned for a fresh connection, whose SYN now gets through.
///
/// Only the unreachable → reachable transition counts: an endpoint that answers probes all along
/// but is slow to serve the watch (a distant member, a slow TLS handshake) is left alone. The
/// transition may span two waits: a probe that failed within `unreachableMemory` (the watchdog
/// of an attempt that has just failed) counts for the backoff wait that follows, so a cut that
/// heals between the two is seen at the wait's first probe, not at its deadline (up to the
/// backoff's 3 s later).
enum EndpointProbe {
    static let probeTimeout: Duration = .milliseconds(500)
    static let probeInterval: Duration = .milliseconds(250)
    /// How long a watch attempt may go unestablished before probing starts.
    static let stallThreshold: Duration = .seconds(1)
    /// How long a failed probe still says the endpoint was unreachable, for a wait that starts
    /// after it: longer than the gap from one wait's last probe to the next wait's first (a
    /// backoff wait's last probe, then an attempt's `stallThreshold`).
    static let unreachableMemory: Duration = .seconds(2)

    /// Whether a probe of `endpoint` failed within `unreachableMemory` (its latest answer).
    static func recentlyUnreachable(_ endpoint: EtcdEndpoint) -> Bool {
        shared.recentlyFalse(for: endpoint, within: unreachableMemory)
    }

    /// The process's probe answers. One probe per endpoint and `probeInterval` in the whole
    /// process: the watch loops waiting on the same endpoint share its answer, so a fleet does
    /// not hit an etcd coming back up with thousands of probes a second.
    private static let shared = SharedAnswers<EtcdEndpoint>()

    /// Whether a TCP connection to the endpoint opens within `probeTimeout` (closed at once).
    private static func connects(_ endpoint: EtcdEndpoint) async -> Bool {
        let timeout = TimeAmount.milliseconds(probeTimeout / .milliseconds(1) == 0 ? 1 : Int64(probeTimeout / .milliseconds(1)))
        do {
            let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connectTimeout(timeout)
                .connect(host: endpoint.host, port: endpoint.port)
                .get()
            try? await channel.close()
            return true
        } catch {
            return false
        }
    }

    /// Probes until `endpoint` is seen to come back (a probe connects after one failed): true.
    /// False when `deadline` passes first, or `stop` says the wait is no longer needed.
    /// Throws CancellationError when cancelled.
    static func waitForRecovery(
        of endpoint: EtcdEndpoint, deadline: ContinuousClock.Instant? = nil, stop: () -> Bool = { false }
    ) async throws -> Bool {
        try await waitForRecovery(of: endpoint, deadline: deadline, stop: stop, answers: shared) { await connects(endpoint) }
    }

    /// `waitForRecovery` with the answers shared through `answers`, each asked by `ask` (tests).
    static func waitForRecovery(
        of endpoint: EtcdEndpoint, deadline: ContinuousClock.Instant?, stop: () -> Bool,
        answers: SharedAnswers<EtcdEndpoint>, ask: @escaping @Sendable () async -> Bool
    ) async throws -> Bool {
        // Unreachable already when the latest probe, this wait's or an earlier one's, failed
        // recently (see unreachableMemory).
        var sawUnreachable = answers.recentlyFalse(for: endpoint, within: unreachableMemory)
        while true {
            try Task.checkCancellation()
            if stop() { return false }
            if let deadline, ContinuousClock.now >= deadline { return false }
            let started = ContinuousClock.now
            if await answers.answer(for: endpoint, maxAge: probeInterval, ask: ask) {
                if sawUnreachable { return true }
            } else {
                sawUnreachable = true
            }
            // The interval runs from the probe's start: after one whose SYN was lost in the cut
            // (it waited out its whole timeout), the next starts at once.
            var pause = max(.zero, probeInterval - (.now - started))
            if let deadline { pause = min(pause, max(.zero, deadline - .now)) }
            try await Task.sleep(for: pause)
        }
    }
}

/// The latest answer to a yes/no question per key, shared by every caller within `maxAge` of
/// when it was asked; callers that come while it is being asked wait for that answer. The
/// latest answer given (and when) is kept too, whoever asked.
final class SharedAnswers<Key: Hashable & Sendable>: Sendable {
    private struct Entry {
        var asked: ContinuousClock.Instant
        var answer: Task<Bool, Never>
    }
    private struct Settled {
        var answer: Bool
        var asked: ContinuousClock.Instant
        var at: ContinuousClock.Instant
    }
    private struct State {
        /// The latest ask per key, answered or not.
        var entries: [Key: Entry] = [:]
        /// The answer of the latest ask that was answered, per key.
        var settled: [Key: Settled] = [:]
    }
    private let state = Mutex(State())

    func answer(for key: Key, maxAge: Duration, ask: @escaping @Sendable () async -> Bool) async -> Bool {
        let task = state.withLock { state in
            let now = ContinuousClock.now
            if let entry = state.entries[key], now - entry.asked < maxAge { return entry.answer }
            let task = Task {
                let answer = await ask()
                // Asks overlap (a failed probe waits out its timeout): the latest asked wins.
                self.state.withLock { state in
                    if let latest = state.settled[key], latest.asked > now { return }
                    state.settled[key] = Settled(answer: answer, asked: now, at: .now)
                }
                return answer
            }
            state.entries[key] = Entry(asked: now, answer: task)
            return task
        }
        return await task.value
    }

    /// Whether the latest answer for `key` (of the latest ask that was answered) was no, given
    /// within `age` of now.
    func recentlyFalse(for key: Key, within age: Duration) -> Bool {
        state.withLock { state in
            guard let latest = state.settled[key] else { return false }
            return !latest.answer && .now - latest.at <= age
        }
    }
}

/// Thrown inside the watch loop when a stuck attempt is abandoned because its endpoint came back.
struct EndpointRecovered: Error {}
