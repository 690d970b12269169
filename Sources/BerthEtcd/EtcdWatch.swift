import FoundationEssentials
import GRPCCore
import Synchronization

extension EtcdClient {
    /// Watches every key under `prefix` from `revision` on, across endpoint failures, calling
    /// `onBatch` with each response's events in revision order. Runs until cancelled.
    ///
    /// A broken, cancelled ("no leader") or silent stream is reopened on the next endpoint from
    /// the revision after the last event delivered, so no revision is skipped or repeated. A
    /// stream counts as silent when it answers none of the progress requests sent every
    /// `watchProgressInterval` for twice that long. An endpoint that ignores progress requests
    /// (etcd 3.4's gRPC proxy) is told from a silent one by a request on the same connection;
    /// its streams are then watched by the transport's keepalive, and, every
    /// `stallCheckInterval` of quiet, by a read of the newest put in the range: one the stream
    /// has still not delivered at the next check throws `EtcdError.watchBehind`.
    ///
    /// - Throws: `EtcdError.compacted` when the revision to resume from is gone (the caller lists
    ///   again and watches from the new revision); `EtcdError.watchBehind` (list again too);
    ///   `EtcdError.authenticationFailed`; `CancellationError`; whatever `onBatch` throws.
    ///
    /// `progressInterval` replaces `watchProgressInterval` for this watch: several watches on
    /// one connection (`--services`) need only one of them to find a cut quickly (the cut
    /// connection fails them all), so the others ask for progress less often.
    public func watch(
        prefix: String,
        fromRevision revision: Int64,
        progressInterval: Duration? = nil,
        onConnected: @escaping @Sendable (EtcdEndpoint) -> Void = { _ in },
        onBatch: @escaping @Sendable (WatchBatch) async throws -> Void
    ) async throws {
        let progress = WatchProgress(next: revision, interval: progressInterval ?? configuration.watchProgressInterval)
        var backoff = Backoff(configuration.backoff)
        while true {
            try Task.checkCancellation()
            let connection = try currentConnection()
            do {
                try await untilEndpointRecovers(connection.endpoint, progress: progress) {
                    try await self.watchSession(connection: connection, prefix: prefix, progress: progress,
                                                onConnected: onConnected, onBatch: onBatch)
                }
            } catch is EndpointRecovered {
                // The attempt (or the stream) was stuck behind a cut that has just healed: a fresh
                // connection now, no backoff (see EndpointProbe); what it replays follows an outage.
                failover(from: connection, reason: "\(connection.endpoint): reachable again; reconnecting")
                if progress.takeCreated() { progress.markRecovered() }
                continue
            } catch let error as RPCError {
                switch Self.classify(error) {
                case .transport:
                    failover(from: connection, reason: "\(connection.endpoint): watch: \(error.message)")
                case .tokenExpired where configuration.credentials != nil:
                    resetToken()
                case .tokenExpired, .authentication:
                    throw EtcdError.authenticationFailed(error.message)
                case .server:
                    if Self.reportsCompaction(error) { throw EtcdError.compacted(0) }
                    failover(from: connection, reason: "\(connection.endpoint): watch: \(error.message)")
                }
            } catch let error as EtcdError {
                switch error {
                case .compacted, .authenticationFailed, .watchBehind: throw error
                default: failover(from: connection, reason: "\(connection.endpoint): \(error)")
                }
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                // Anything else the transport throws (a closed channel, ...) is a broken stream.
                failover(from: connection, reason: "\(connection.endpoint): watch: \(error)")
            }
            if Task.isCancelled { throw CancellationError() }
            // A stream that was established and then broke reconnects at once; repeated
            // failures to establish one back off, unless the endpoint is seen to come back.
            if progress.takeCreated() {
                backoff.reset()
            } else {
                _ = try await EndpointProbe.waitForRecovery(of: currentEndpoint, deadline: .now + backoff.nextDelay())
            }
        }
    }

    /// Runs one watch attempt under a watchdog: while the stream is not established (after
    /// `EndpointProbe.stallThreshold`), or is established but has missed a progress answer, the
    /// endpoint is probed; when it is seen to come back, the attempt is cancelled and
    /// `EndpointRecovered` thrown, so that a fresh connection replaces one stuck behind a cut
    /// (TCP would retransmit into it only after its backoff, seconds later).
    private func untilEndpointRecovers(
        _ endpoint: EtcdEndpoint, progress: WatchProgress, _ attempt: @escaping @Sendable () async throws -> Void
    ) async throws {
        let interval = progress.interval
        let healthy: @Sendable () -> Bool = {
            progress.isCreated && (!progress.silenceMeansTrouble || progress.silence <= interval + EndpointProbe.stallThreshold)
        }
        // How often a healthy stream is looked at: a quarter of its progress interval, between
        // 0.5 and 5 s. A host with `--services` runs a hundred streams whose progress interval
        // is 30 s (the first stream finds a cut): at 0.5 s each, their watchdogs woke the host
        // 200 times a second (a fleet of them, tens of thousands).
        let lookAgain = max(.milliseconds(500), min(interval / 4, .seconds(5)))
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await attempt()
                return true
            }
            group.addTask {
                try await Task.sleep(for: EndpointProbe.stallThreshold)
                while true {
                    if healthy() {
                        try await Task.sleep(for: lookAgain)
                        continue
                    }
                    if try await EndpointProbe.waitForRecovery(of: endpoint, stop: healthy) {
                        throw EndpointRecovered()
                    }
                }
            }
            while let attemptEnded = try await group.next() {
                if attemptEnded {
                    group.cancelAll()
                    return
                }
            }
        }
    }

    /// One watch stream on one connection; returns or throws when it ends.
    private func watchSession(
        connection: EtcdConnection, prefix: String, progress: WatchProgress,
        onConnected: @escaping @Sendable (EtcdEndpoint) -> Void,
        onBatch: @escaping @Sendable (WatchBatch) async throws -> Void
    ) async throws {
        var options = CallOptions.defaults
        options.waitForReady = false
        options.maxResponseMessageBytes = 256 * 1024 * 1024
        var metadata = try await self.metadata(on: connection, options: options)
        // Ask the member to cancel the watch when it loses its leader, so a cut-off member
        // never leaves us watching a frozen history (etcd's clientv3 WithRequireLeader).
        metadata.addString("true", forKey: "hasleader")

        var create = Etcdserverpb_WatchCreateRequest()
        (create.key, create.rangeEnd) = Self.keyRange(ofPrefix: prefix)
        create.startRevision = progress.next
        create.prevKv = true
        create.progressNotify = true
        var createMessage = Etcdserverpb_WatchRequest()
        createMessage.createRequest = create
        var progressMessage = Etcdserverpb_WatchRequest()
        progressMessage.progressRequest = Etcdserverpb_WatchProgressRequest()
        let createRequest = createMessage
        let progressRequest = progressMessage
        let interval = progress.interval
        let endpoint = connection.endpoint
        progress.touch()
        progress.use(endpoint)
        // On this connection, within one default progress interval, the newest put in the range:
        // whether the peer answers at all (serializable: no consensus round), and, for one that
        // answers no progress request, whether the stream missed a put (linearizable: etcd's
        // gRPC proxy answers a serializable read from its cache, which writes made directly to
        // etcd leave stale).
        var latest = Etcdserverpb_RangeRequest()
        (latest.key, latest.rangeEnd) = Self.keyRange(ofPrefix: prefix)
        latest.sortOrder = .descend
        latest.sortTarget = .mod
        latest.limit = 1
        latest.keysOnly = true
        let latestRequest = latest
        var probeOptions = options
        probeOptions.timeout = configuration.watchProgressInterval
        let probeCallOptions = probeOptions
        let probeMetadata = metadata
        @Sendable func newestPut(serializable: Bool) async -> Etcdserverpb_RangeResponse? {
            var request = latestRequest
            request.serializable = serializable
            return try? await Etcdserverpb_KV.Client(wrapping: connection.client)
                .range(request, metadata: probeMetadata, options: probeCallOptions)
        }
        let stallCheck = Self.stallCheckInterval

        if progress.hadStream && progress.next > 1 && (progress.answersProgress ?? answersProgress(endpoint)) != true {
            // Resuming after a stream broke, on an endpoint that no stream of this client has
            // seen answer a progress request (etcd's gRPC proxy answers none): is the history
            // from `next` on still there? A one-key read pinned to the revision before `next`
            // fails when etcd compacted past it (a compaction
            // exactly at `next` too, which then costs one listing more than needed). etcd says
            // so on the new watch itself, but the proxy can join the watch to a shared upstream
            // watch that died of a compaction and never answer it. Linearizable, so the proxy
            // passes the read to etcd and does not answer it from its cache. Not against etcd
            // itself: a restarted etcd would meet a read per stream of the fleet.
            // Unsorted: a sorted read (as the newest-put one) makes etcd sort the whole range.
            // A few at a time per client, and none once one of them found the revision
            // compacted: a host with `--services` resumes a hundred streams at once, and after
            // a compaction one answer does for all (a fleet's reads all at once held etcd's
            // answers past their timeouts, and their retries kept it so).
            let revision = progress.next - 1
            var pinned = Etcdserverpb_RangeRequest()
            (pinned.key, pinned.rangeEnd) = Self.keyRange(ofPrefix: prefix)
            pinned.revision = revision
            pinned.limit = 1
            pinned.keysOnly = true
            let request = pinned
            try await resumeReads.run {
                if self.knownCompacted(revision) { throw EtcdError.compacted(0) }
                do {
                    _ = try await Etcdserverpb_KV.Client(wrapping: connection.client)
                        .range(request, metadata: metadata, options: probeCallOptions)
                } catch let error as RPCError where Self.reportsCompaction(error) {
                    self.learnt(compacted: revision)
                    throw error
                }
            }
        }

        try await Etcdserverpb_Watch.Client(wrapping: connection.client).watch(
            metadata: metadata, options: options,
            requestProducer: { writer in
                try await writer.write(createRequest)
                // The stream stays open for as long as the watch runs: closing it would end it.
                while true {
                    try await Task.sleep(for: interval)
                    if progress.silence > interval * 2 {
                        switch progress.answersProgress {
                        case true?:
                            throw RPCError(code: .unavailable, message: "the watch stream has been silent for \(progress.silence)")
                        case nil:
                            // No progress request answered yet: a dead peer, or one that ignores
                            // them. A read on the same connection tells which.
                            guard await newestPut(serializable: true) != nil else {
                                throw RPCError(code: .unavailable, message: "the watch stream has been silent for \(progress.silence)")
                            }
                            progress.ignoresProgress()
                            self.learnt(endpoint, answersProgress: false)
                        case false?:
                            // Quiet, with no progress answers to tell quiet from stuck: is there
                            // a put the stream has not delivered, and still not one check later?
                            guard progress.silence >= stallCheck, progress.stallCheckDue(every: stallCheck) else { break }
                            guard let newest = await newestPut(serializable: false)?.kvs.first?.modRevision else { break }
                            if let delivered = progress.behind(newest: newest) {
                                throw EtcdError.watchBehind(delivered: delivered, latest: newest)
                            }
                        }
                    }
                    if progress.answersProgress != false { try await writer.write(progressRequest) }
                }
            },
            onResponse: { response in
                for try await message in response.messages {
                    // A quiet stream still answers a progress request every interval; silent
                    // for a second more, then back: an outage ended.
                    if progress.silenceMeansTrouble && progress.silence > interval + EndpointProbe.stallThreshold { progress.markRecovered() }
                    progress.touch()
                    connection.answers.add(1, ordering: .relaxed)
                    if message.compactRevision != 0 { throw EtcdError.compacted(message.compactRevision) }
                    if message.canceled {
                        throw RPCError(code: .unavailable, message: "cancelled by the server: \(message.cancelReason)")
                    }
                    if message.created {
                        // A stream after one that broke: whatever it replays may be an outage's.
                        if progress.hadStream { progress.markRecovered() }
                        progress.markCreated()
                        self.markHealthy(connection)
                        onConnected(endpoint)
                    }
                    if message.events.isEmpty {
                        // A progress notification: the stream is alive. Its revision is not used
                        // to resume (etcd 3.4 may send it before an unsynced watcher caught up).
                        if !message.created && progress.answersProgress != true {
                            progress.answersProgressRequests()
                            self.learnt(endpoint, answersProgress: true)
                        }
                        continue
                    }
                    let events = message.events.map(WatchEvent.init)
                    let last = events.last!.keyValue.modRevision
                    guard last >= progress.next else { continue }  // replayed: already delivered
                    var batch = WatchBatch(events: events.filter { $0.keyValue.modRevision >= progress.next },
                                           revision: last, endpoint: endpoint)
                    batch.afterOutage = progress.recoveredRecently
                    try await onBatch(batch)
                    progress.delivered(through: last)
                }
                throw RPCError(code: .unavailable, message: "the watch stream ended")
            })
    }

}

/// The resume point of a watch, when its stream last said anything, and when it last came back
/// from an outage.
final class WatchProgress: Sendable {
    private struct State {
        var next: Int64
        var lastMessage: ContinuousClock.Instant = .now
        var created = false
        var hadStream = false
        var recovered: ContinuousClock.Instant?
        /// Whether the endpoint answers progress requests (nil: not known yet), and which.
        var answersProgress: Bool?
        var endpoint: EtcdEndpoint?
        /// Without progress answers: the last stall check, and the newest put in the range it
        /// found undelivered.
        var lastStallCheck: ContinuousClock.Instant?
        var undelivered: Int64?
    }

    /// How long after an outage ends its replayed events are still flagged `afterOutage`.
    static let recoveryWindow: Duration = .seconds(2)

    private let state: Mutex<State>
    /// Between progress requests; silent for twice this, a stream is dropped.
    let interval: Duration

    init(next: Int64, interval: Duration = .seconds(2)) {
        state = Mutex(State(next: next))
        self.interval = interval
    }

    func markCreated() {
        state.withLock {
            $0.created = true
            $0.hadStream = true
        }
    }
    /// Whether an earlier stream was established (the one being created replaces it).
    var hadStream: Bool { state.withLock { $0.hadStream && !$0.created } }
    func markRecovered() { state.withLock { $0.recovered = .now } }
    var recoveredRecently: Bool {
        state.withLock { state in state.recovered.map { .now - $0 < Self.recoveryWindow } ?? false }
    }
    /// Whether the current stream was established.
    var isCreated: Bool { state.withLock { $0.created } }
    /// Whether a stream was established since the last call.
    func takeCreated() -> Bool {
        state.withLock { state in
            defer { state.created = false }
            return state.created
        }
    }

    /// A stream on `endpoint` begins: what was learnt of another endpoint is forgotten.
    func use(_ endpoint: EtcdEndpoint) {
        state.withLock { state in
            if state.endpoint != endpoint {
                state.endpoint = endpoint
                state.answersProgress = nil
            }
        }
    }
    var answersProgress: Bool? { state.withLock { $0.answersProgress } }
    /// Whether a stall check is due (one every `interval`; the first at once).
    func stallCheckDue(every interval: Duration) -> Bool {
        state.withLock { state in
            if let last = state.lastStallCheck, .now - last < interval { return false }
            state.lastStallCheck = .now
            return true
        }
    }
    /// The newest put in the range is `newest`: the last revision delivered when that put is
    /// past it and was already found undelivered at the previous check (the stream is stuck),
    /// else nil.
    func behind(newest: Int64) -> Int64? {
        state.withLock { state in
            guard newest >= state.next else {
                state.undelivered = nil
                return nil
            }
            defer { state.undelivered = newest }
            // Stuck when the put found undelivered last time is still undelivered.
            guard let earlier = state.undelivered, earlier >= state.next else { return nil }
            return state.next - 1
        }
    }
    func answersProgressRequests() { state.withLock { $0.answersProgress = true } }
    func ignoresProgress() { state.withLock { $0.answersProgress = false } }
    /// Whether a silent stream is a sign of trouble: not on an endpoint that ignores progress
    /// requests, whose streams are quiet whenever the registry is.
    var silenceMeansTrouble: Bool { state.withLock { $0.answersProgress != false } }

    var next: Int64 { state.withLock { $0.next } }
    var silence: Duration { state.withLock { .now - $0.lastMessage } }
    func touch() {
        state.withLock { state in
            state.lastMessage = .now
            state.lastStallCheck = nil
        }
    }
    func delivered(through revision: Int64) { state.withLock { $0.next = max($0.next, revision + 1) } }
}

extension WatchEvent {
    init(_ event: Mvccpb_Event) {
        self.init(kind: event.type == .delete ? .delete : .put, keyValue: KeyValue(event.kv),
                  previous: event.hasPrevKv ? KeyValue(event.prevKv) : nil)
    }
}

extension EtcdClient {
    /// How often a quiet watch on an endpoint that answers no progress request reads the newest
    /// put of its range (`EtcdError.watchBehind`).
    /// Each check is one linearizable Range per quiet watch stream; a stuck stream is found
    /// within two of them.
    static let stallCheckInterval: Duration = .seconds(30)
}
