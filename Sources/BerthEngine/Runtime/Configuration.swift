import BerthSystem

/// How bytes are moved between the two sockets of a connection.
public enum RelayMode: String, Sendable, CaseIterable {
    /// splice(2) through a pooled pipe: zero-copy, best for bulk.
    case splice
    /// read/send through a per-worker buffer: fewest steps for small messages.
    case copy
    /// Copy until one read returns `spliceThreshold` bytes or more, then splice that direction
    /// (HAProxy's splice-auto idea).
    case auto
}

/// Process-wide settings of the data plane; fixed for the life of an `Engine`.
public struct EngineConfiguration: Sendable {
    /// Worker threads, each with its own epoll instance, listeners and connections.
    public var workers: Int = max(1, availableCPUCount())
    /// `auto` by measurement (docs/BENCHMARKS.md): copy's cost for small messages, splice's for bulk.
    public var relay: RelayMode = .auto
    /// With `.auto`: a read at least this large switches that direction to splice.
    public var spliceThreshold: Int = 16 * 1024
    /// Concurrent client connections across all workers; past it, accepting pauses.
    public var maxConnections: Int = max(64, (openFileLimit() - 64) / 2)
    /// How long removed backends, removed frontends and a stopping engine let connections run.
    public var drainTimeout: Int64 = 30_000
    /// Bound on connections accepted per listener wake-up.
    public var acceptBurst: Int = 64
    /// Bound on events taken per epoll_wait.
    public var eventsPerWait: Int = 256
    /// Bound on chunks one direction of one connection moves per wake-up before yielding.
    public var chunksPerWakeup: Int = 16
    /// Size of the per-worker copy buffer (one read).
    public var copyBufferSize: Int = 64 * 1024
    /// Empty pipes kept per worker, and pipes lent at once per worker.
    public var idlePipes: Int = 64
    public var maxPipes: Int = 4096
    /// Pipe capacity in bytes (F_SETPIPE_SZ); 0 keeps the kernel default.
    public var pipeSize: Int = 0
    /// Pins worker i to CPU `cpus[i % cpus.count]` when not empty.
    public var cpus: [Int] = []
    /// Pause before accepting again after EMFILE/ENFILE (also resumed as soon as a connection closes).
    public var acceptRetryDelay: Int64 = 100
    /// Passive health (HAProxy's `observe layer4`): after this many consecutive failed connects
    /// to one backend on one worker, `backendFailed` is called (0: off).
    public var observeErrors = 0
    /// Called on a worker thread, so it must be quick and must not block (queue and wake).
    public var backendFailed: (@Sendable (_ frontend: String, _ backend: String) -> Void)?
    /// The connection log (nil: none; frontends' `logConnections` then logs nothing).
    public var connectionLog: ConnectionLogSettings?

    public init() {}
}
