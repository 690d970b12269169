import GRPCCore

/// One key and its value, as etcd stores it.
public struct KeyValue: Sendable, Equatable {
    public var key: String
    public var value: [UInt8]
    public var createRevision: Int64
    public var modRevision: Int64
    public var version: Int64
    public var lease: Int64

    public init(key: String, value: [UInt8], createRevision: Int64 = 0, modRevision: Int64 = 0, version: Int64 = 0, lease: Int64 = 0) {
        self.key = key
        self.value = value
        self.createRevision = createRevision
        self.modRevision = modRevision
        self.version = version
        self.lease = lease
    }

    public var valueText: String { String(decoding: value, as: UTF8.self) }

    init(_ message: Mvccpb_KeyValue) {
        self.init(key: String(decoding: message.key, as: UTF8.self), value: [UInt8](message.value),
                  createRevision: message.createRevision, modRevision: message.modRevision,
                  version: message.version, lease: message.lease)
    }
}

/// The keys under a prefix at one revision.
public struct RangeResult: Sendable {
    public var keyValues: [KeyValue]
    /// The store's revision the result is consistent with: watch from `revision + 1`.
    public var revision: Int64
}

/// One change seen by a watch.
public struct WatchEvent: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case put, delete }
    public var kind: Kind
    /// For a delete: the key, with `modRevision` the revision of the delete.
    public var keyValue: KeyValue
    public var previous: KeyValue?
}

/// What one watch response delivered.
public struct WatchBatch: Sendable {
    public var events: [WatchEvent]
    /// The revision the watcher is consistent with after this batch: the last event's revision,
    /// or for a progress notification the store's revision.
    public var revision: Int64
    public var isProgressNotification: Bool { events.isEmpty }
    /// The endpoint that delivered it.
    public var endpoint: EtcdEndpoint
    /// It came right after an outage of the watch (a stream that went silent for longer than a
    /// progress interval and then resumed, or a new stream after a broken one): its events may
    /// be what happened during the outage, lease expiries among them.
    public var afterOutage = false
}

public enum EtcdError: Error, CustomStringConvertible, Sendable, Equatable {
    case invalidEndpoint(String, String)
    /// No endpoint answered (the last reason).
    case unavailable(String)
    /// Wrong username or password, or auth needed and none given.
    case authenticationFailed(String)
    /// The watch's start revision (or a read's pinned revision) was compacted: list again from
    /// the current revision.
    case compacted(Int64)
    /// The server answered with an error (code and message).
    case server(String, String)
    /// A watch stream was cancelled by the server (no leader, ...).
    case watchCancelled(String)
    /// A watch on an endpoint that answers no progress request (etcd's gRPC proxy) delivered
    /// nothing while its range kept a newer put for a whole check period: the stream is stuck
    /// (the proxy can leave a watch created at a compacted revision without a word). List
    /// again, as after a compaction.
    case watchBehind(delivered: Int64, latest: Int64)
    case invalidConfiguration(String)

    public var description: String {
        switch self {
        case .invalidEndpoint(let text, let reason): "'\(text)' is not an etcd endpoint: \(reason)"
        case .unavailable(let reason): "etcd is unavailable: \(reason)"
        case .authenticationFailed(let reason): "etcd authentication failed: \(reason)"
        case .compacted(let revision): "etcd compacted the watched revisions (compact revision \(revision))"
        case .server(let code, let message): "etcd error (\(code)): \(message)"
        case .watchCancelled(let reason): "etcd cancelled the watch: \(reason)"
        case .watchBehind(let delivered, let latest):
            "the watch delivered nothing past revision \(delivered) while its range holds a put at \(latest)"
        case .invalidConfiguration(let reason): "etcd client configuration: \(reason)"
        }
    }
}

/// Connection state, for the stats page and logs.
public struct EtcdStatus: Sendable, Equatable {
    /// The endpoint requests go to now.
    public var endpoint: String
    /// Whether the last request or watch message on it succeeded.
    public var connected: Bool
    /// Endpoint switches since start.
    public var failovers: UInt64
    public var lastError: String?
}
