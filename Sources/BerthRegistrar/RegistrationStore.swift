import BerthEtcd

/// The etcd calls the registrar makes, in `BerthEtcd.EtcdClient`'s shape, so the reconcile logic
/// is written (and unit-tested) against this protocol and runs on the real client through a
/// one-screen adapter. Implementations reconnect and fail over on their own; every call may
/// throw while etcd is unreachable, and the registrar retries.
public protocol RegistrationStore: Sendable {
    /// A new lease of `ttl` seconds; its id.
    func grantLease(ttl: Int64) async throws -> Int64
    /// One keep-alive; the remaining TTL in seconds, 0 when the lease no longer exists.
    func keepAliveOnce(lease: Int64) async throws -> Int64
    func revokeLease(_ lease: Int64) async throws
    func put(key: String, value: String, lease: Int64) async throws
    func delete(key: String) async throws
    /// Every key under `prefix` with its value.
    func get(prefix: String) async throws -> [String: String]
    /// The values of exactly `keys` (absent ones left out): the registrar's read-back of what
    /// it wrote, which must not cost a listing of the whole registry on every host.
    func get(keys: [String]) async throws -> [String: String]
}

/// A call that did not finish before its deadline.
public struct TimedOut: Error, Sendable, CustomStringConvertible {
    public let what: String
    public var description: String { "\(what) timed out" }
}

/// Runs `operation`, cancelling it and throwing `TimedOut` if it takes longer than `timeout`.
/// The operation must honour cancellation (NIO's async channels and gRPC calls do). etcd's
/// client gets the deadline too, a little inside it (`EtcdClient.callTimeout`): its calls then
/// time out on their own and are judged as timeouts (a cut connection fails over), where a
/// cancellation says nothing of the connection.
func withDeadline<Result: Sendable>(_ timeout: Duration, what: String, _ operation: @escaping @Sendable () async throws -> Result) async throws -> Result {
    try await withThrowingTaskGroup(of: Result?.self) { group in
        group.addTask {
            try await EtcdClient.$callTimeout.withValue(timeout - min(timeout / 8, .milliseconds(250))) { try await operation() }
        }
        group.addTask {
            try await Task.sleep(for: timeout)
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let result = first else {
            throw TimedOut(what: what)
        }
        return result
    }
}
