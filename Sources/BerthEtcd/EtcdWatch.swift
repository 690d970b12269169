import FoundationEssentials
import GRPCCore
import Synchronization

extension EtcdClient {
    /// Watches every key under `prefix`: `watch(prefixes:)` with one prefix.
    public func watch(
        prefix: String,
        fromRevision revision: Int64,
        onConnected: @escaping @Sendable (EtcdEndpoint) -> Void = { _ in },
        onBatch: @escaping @Sendable (WatchBatch) async throws -> Void
    ) async throws {
        try await watch(prefixes: [prefix], fromRevision: revision, onConnected: onConnected, onBatch: onBatch)
    }

    /// Watches every key under each of `prefixes` from `revision` on, across endpoint failures,
    /// calling `onBatch` with each response's events in revision order (per prefix: the
    /// prefixes' batches interleave). Runs until cancelled.
    ///
    /// All the prefixes share one gRPC stream, a watch each: etcd keeps one stream per host,
    /// not one per prefix (`--services` watches a hundred), and one progress request a stream.
    /// etcd, and its gRPC proxy, number a stream's watches 0, 1, 2... in the order they were
    /// asked for; that number tells which prefix a response is for.
    ///
    /// A broken, cancelled ("no leader") or silent stream is reopened on the next endpoint,
    /// each prefix from the revision after the last event delivered for it, so no revision is
    /// skipped or repeated. A stream counts as silent when it answers none of the progress
    /// requests sent every `watchProgressInterval` for twice that long. An endpoint that
    /// ignores progress requests (etcd 3.4's gRPC proxy) is told from a silent one by a request
    /// on the same connection; its streams are then watched by the transport's keepalive, and,
    /// every `stallCheckInterval` of quiet, by a read of the newest put in each range: one the
    /// stream has still not delivered at the next check throws `EtcdError.watchBehind`.
    ///
    /// - Throws: `EtcdError.compacted` when the revision to resume from is gone (the caller lists
    ///   again and watches from the new revision); `EtcdError.watchBehind` (list again too);
    ///   `EtcdError.authenticationFailed`; `CancellationError`; whatever `onBatch` throws.
    public func watch(
        prefixes: [String],
        fromRevision revision: Int64,
        onConnected: @escaping @Sendable (EtcdEndpoint) -> Void = { _ in },
        onBatch: @escaping @Sendable (WatchBatch) async throws -> Void
    ) async throws {
        precondition(!prefixes.isEmpty, "a watch needs a prefix")
        let progress = WatchProgress(ranges: prefixes.count, next: revision, interval: configuration.watchProgressInterval)
        var backoff = Backoff(configuration.backoff)
        while true {
            try Task.checkCancellation()
            let connection = try currentConnection()
            do {
                try await untilEndpointRecovers(connection.endpoint, progress: progress) {
                    try await self.watchSession(connection: connection, prefixes: prefixes, progress: progress,
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
    /// `EndpointProbe.stallThreshold`, or at once when the endpoint's latest probe failed
    /// recently), or is established but has missed a progress answer, the
    /// endpoint is probed; when it is seen to come back, the attempt is cancelled and
    /// `EndpointRecovered` thrown, so that a fresh connection replaces one stuck behind a cut
    /// (TCP would retransmit into it only after its backoff, seconds later).
    private func untilEndpointRecovers(
        _ endpoint: EtcdEndpoint, progress: WatchProgress, _ attempt: @escaping @Sendable () async throws -> Void
    ) async throws {
        let healthy: @Sendable () -> Bool = { progress.isCreated && !progress.missedAnswer }
        // A healthy stream is looked at again when it would stop being healthy if nothing came
        // meanwhile (at least 0.5 s on), or every 5 s on an endpoint where silence means
        // nothing: a fleet of hosts, each woken every half second for nothing, adds up.
        let lookAgain: @Sendable () -> Duration = {
            guard progress.silenceMeansTrouble else { return .seconds(5) }
            return max(.milliseconds(500), progress.answerDue - progress.silence)
        }
        try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                try await attempt()
                return true
            }
            group.addTask {
                // Right after a probe failed (the cut still on when this attempt began), at
                // once: a heal during the attempt's first second is seen within a probe.
                if !EndpointProbe.recentlyUnreachable(endpoint) { try await Task.sleep(for: EndpointProbe.stallThreshold) }
                while true {
                    if healthy() {
                        try await Task.sleep(for: lookAgain())
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

    /// One watch stream on one connection, a watch per prefix; returns or throws when it ends.
    private func watchSession(
        connection: EtcdConnection, prefixes: [String], progress: WatchProgress,
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

        progress.beginStream()
        let createRequests = prefixes.indices.map { index in
            var create = Etcdserverpb_WatchCreateRequest()
            (create.key, create.rangeEnd) = Self.keyRange(ofPrefix: prefixes[index])
            create.startRevision = progress.next(of: index)
            create.prevKv = true
            create.progressNotify = true
            var message = Etcdserverpb_WatchRequest()
            message.createRequest = create
            return message
        }
        var progressMessage = Etcdserverpb_WatchRequest()
        progressMessage.progressRequest = Etcdserverpb_WatchProgressRequest()
        let progressRequest = progressMessage
        let interval = progress.interval
        let endpoint = connection.endpoint
        progress.touch()
        progress.use(endpoint)
        var probeOptions = options
        probeOptions.timeout = configuration.watchProgressInterval
        let probeCallOptions = probeOptions
        let probeMetadata = metadata
        // On this connection, within one default progress interval: whether the peer answers at
        // all (a serializable read of one key: no consensus round).
        var anyKey = Self.oneKey(of: prefixes[0])
        anyKey.serializable = true
        let answersRequest = anyKey
        @Sendable func answers() async -> Bool {
            (try? await Etcdserverpb_KV.Client(wrapping: connection.client)
                .range(answersRequest, metadata: probeMetadata, options: probeCallOptions)) != nil
        }
        // For a peer that answers no progress request, whether the stream missed a put.
        let newestRequests = Self.newestPutRequests(of: prefixes)
        @Sendable func newestPuts() async -> [Int64?]? {
            await self.newestPuts(newestRequests, ranges: prefixes.count, on: connection, metadata: probeMetadata, options: probeCallOptions)
        }
        let stallCheck = Self.stallCheckInterval

        if progress.hadStream && progress.earliestNext > 1 && (progress.answersProgress ?? answersProgress(endpoint)) != true {
            // Resuming after a stream broke, on an endpoint that no stream of this client has
            // seen answer a progress request (etcd's gRPC proxy answers none): is the history
            // from the earliest prefix's next revision on still there? A one-key read pinned to
            // the revision before it fails when etcd compacted past it (a compaction covers
            // the whole store; one exactly at that revision too, which then costs one listing
            // more than needed). etcd says so on the new watch itself, but the proxy can join
            // the watch to a shared upstream watch that died of a compaction and never answer
            // it. Linearizable, so the proxy passes the read to etcd and does not answer it
            // from its cache. Not against etcd itself: a restarted etcd would meet a read per
            // stream of the fleet. Unsorted: a sorted read makes etcd sort the whole range.
            // A few at a time per client, and none once one of them found the revision
            // compacted (a fleet's reads all at once held etcd's answers past their
            // timeouts, and their retries kept it so).
            let revision = progress.earliestNext - 1
            var pinned = Self.oneKey(of: prefixes[0])
            pinned.revision = revision
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
                try await writer.write(contentsOf: createRequests)
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
                            guard await answers() else {
                                throw RPCError(code: .unavailable, message: "the watch stream has been silent for \(progress.silence)")
                            }
                            progress.ignoresProgress()
                            self.learnt(endpoint, answersProgress: false)
                        case false?:
                            // Quiet, with no progress answers to tell quiet from stuck: is there
                            // a put the stream has not delivered, and still not one check later?
                            guard progress.silence >= stallCheck, progress.stallCheckDue(every: stallCheck) else { break }
                            guard let newest = await newestPuts() else { break }
                            if let behind = progress.behind(newest: newest) {
                                throw EtcdError.watchBehind(delivered: behind.delivered, latest: behind.latest)
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
                    if progress.missedAnswer { progress.markRecovered() }
                    progress.touch()
                    connection.answers.add(1, ordering: .relaxed)
                    if message.compactRevision != 0 { throw EtcdError.compacted(message.compactRevision) }
                    if message.canceled {
                        throw RPCError(code: .unavailable, message: "cancelled by the server: \(message.cancelReason)")
                    }
                    if message.created {
                        switch progress.created(watch: message.watchID) {
                        case .invalid:
                            throw RPCError(code: .unavailable, message: "the server created watch \(message.watchID), not one of the \(prefixes.count) asked for")
                        case .waiting:
                            break
                        case .established:
                            // A stream after one that broke: whatever it replays may be an outage's.
                            if progress.hadStream { progress.markRecovered() }
                            progress.markCreated()
                            self.markHealthy(connection)
                            onConnected(endpoint)
                        }
                        continue
                    }
                    if message.events.isEmpty {
                        // A progress notification (for the stream: watch -1; or for one watch):
                        // the stream is alive. Its revision is not used to resume (etcd 3.4
                        // may send it before an unsynced watcher caught up).
                        if progress.answersProgress != true {
                            progress.answersProgressRequests()
                            self.learnt(endpoint, answersProgress: true)
                        }
                        continue
                    }
                    guard let range = progress.range(ofWatch: message.watchID) else {
                        throw RPCError(code: .unavailable, message: "events for watch \(message.watchID), which this stream did not create")
                    }
                    let events = message.events.map(WatchEvent.init)
                    let last = events.last!.keyValue.modRevision
                    let next = progress.next(of: range)
                    guard last >= next else { continue }  // replayed: already delivered
                    var batch = WatchBatch(events: events.filter { $0.keyValue.modRevision >= next },
                                           revision: last, endpoint: endpoint)
                    batch.afterOutage = progress.recoveredRecently
                    try await onBatch(batch)
                    progress.delivered(range, through: last)
                }
                throw RPCError(code: .unavailable, message: "the watch stream ended")
            })
    }
}

extension EtcdClient {
    /// The reads of the newest put of each range: one transaction per 128 ranges
    /// (linearizable: etcd's gRPC proxy answers a serializable read from its cache, which
    /// writes made directly to etcd leave stale; a transaction it passes on).
    static func newestPutRequests(of prefixes: [String]) -> [Etcdserverpb_TxnRequest] {
        transactions(of: prefixes) { prefix in
            var latest = oneKey(of: prefix)
            latest.sortOrder = .descend
            latest.sortTarget = .mod
            return latest
        }
    }

    /// A read of one key (its name only) under `prefix`.
    static func oneKey(of prefix: String) -> Etcdserverpb_RangeRequest {
        var request = rangeRequest(ofPrefix: prefix)
        request.limit = 1
        request.keysOnly = true
        return request
    }

    /// The newest put's revision of each range (nil: the range is empty) on `connection`; nil
    /// when any read fails or the answers do not cover every range.
    func newestPuts(_ requests: [Etcdserverpb_TxnRequest], ranges: Int, on connection: EtcdConnection,
                    metadata: Metadata, options: CallOptions) async -> [Int64?]? {
        var newest: [Int64?] = []
        for request in requests {
            guard let response = try? await Etcdserverpb_KV.Client(wrapping: connection.client)
                .txn(request, metadata: metadata, options: options) else { return nil }
            newest += response.responses.map { $0.responseRange.kvs.first?.modRevision }
        }
        return newest.count == ranges ? newest : nil
    }

    /// `newestPuts` on the current connection (tests).
    func newestPuts(of prefixes: [String]) async throws -> [Int64?]? {
        let connection = try currentConnection()
        var options = CallOptions.defaults
        options.timeout = configuration.requestTimeout
        let metadata = try await self.metadata(on: connection, options: options)
        return await newestPuts(Self.newestPutRequests(of: prefixes), ranges: prefixes.count, on: connection,
                                metadata: metadata, options: options)
    }
}

/// The resume point of each range of a watch, the watches its stream has created, when the
/// stream last said anything, and when it last came back from an outage.
final class WatchProgress: Sendable {
    private struct State {
        /// Per range: the first revision not yet delivered.
        var next: [Int64]
        var lastMessage: ContinuousClock.Instant = .now
        /// The current stream's watches that the server said it created.
        var createdWatches: Set<Int64> = []
        var created = false
        var hadStream = false
        var recovered: ContinuousClock.Instant?
        /// Whether the endpoint answers progress requests (nil: not known yet), and which.
        var answersProgress: Bool?
        var endpoint: EtcdEndpoint?
        /// Without progress answers: the last stall check, and per range the newest put it
        /// found undelivered.
        var lastStallCheck: ContinuousClock.Instant?
        var undelivered: [Int64?]
    }

    enum Creation { case waiting, established, invalid }

    /// How long after an outage ends its replayed events are still flagged `afterOutage`.
    static let recoveryWindow: Duration = .seconds(2)

    private let state: Mutex<State>
    /// Between progress requests; silent for twice this, a stream is dropped.
    let interval: Duration

    init(ranges: Int = 1, next: Int64, interval: Duration = .seconds(2)) {
        state = Mutex(State(next: Array(repeating: next, count: ranges), undelivered: Array(repeating: nil, count: ranges)))
        self.interval = interval
    }

    /// A new stream is opened: none of its watches exists yet.
    func beginStream() { state.withLock { $0.createdWatches = [] } }
    /// The server created watch `id` of the current stream: established once every range has
    /// its watch.
    func created(watch id: Int64) -> Creation {
        state.withLock { state in
            guard id >= 0, id < state.next.count, state.createdWatches.insert(id).inserted else { return .invalid }
            return state.createdWatches.count == state.next.count ? .established : .waiting
        }
    }
    /// The range a watch of the current stream is for (nil: not one it created).
    func range(ofWatch id: Int64) -> Int? {
        state.withLock { $0.createdWatches.contains(id) ? Int(id) : nil }
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
    /// The newest put of each range is `newest` (nil: the range is empty): for the first range
    /// whose newest put is past what it delivered and was already found undelivered at the
    /// previous check (the stream is stuck), the last revision delivered there and that put;
    /// else nil.
    func behind(newest: [Int64?]) -> (delivered: Int64, latest: Int64)? {
        state.withLock { state in
            var stuck: (delivered: Int64, latest: Int64)?
            for range in state.next.indices {
                let next = state.next[range]
                guard range < newest.count, let latest = newest[range], latest >= next else {
                    state.undelivered[range] = nil
                    continue
                }
                // Stuck when the put found undelivered last time is still undelivered.
                if stuck == nil, let earlier = state.undelivered[range], earlier >= next { stuck = (next - 1, latest) }
                state.undelivered[range] = latest
            }
            return stuck
        }
    }
    func answersProgressRequests() { state.withLock { $0.answersProgress = true } }
    func ignoresProgress() { state.withLock { $0.answersProgress = false } }
    /// Whether a silent stream is a sign of trouble: not on an endpoint that ignores progress
    /// requests, whose streams are quiet whenever the registry is.
    var silenceMeansTrouble: Bool { state.withLock { $0.answersProgress != false } }
    /// How long a stream may be silent before it has missed a progress answer: an interval,
    /// and a second for the answer to come.
    var answerDue: Duration { interval + EndpointProbe.stallThreshold }
    /// Whether the stream has missed a progress answer (a sign of trouble where silence means
    /// trouble).
    var missedAnswer: Bool { silenceMeansTrouble && silence > answerDue }

    /// The first revision not yet delivered in `range`.
    func next(of range: Int) -> Int64 { state.withLock { $0.next[range] } }
    /// The earliest of the ranges' next revisions: where the whole watch resumes from, at worst.
    var earliestNext: Int64 { state.withLock { $0.next.min() ?? 0 } }
    var silence: Duration { state.withLock { .now - $0.lastMessage } }
    func touch() {
        state.withLock { state in
            state.lastMessage = .now
            state.lastStallCheck = nil
        }
    }
    func delivered(_ range: Int = 0, through revision: Int64) {
        state.withLock { $0.next[range] = max($0.next[range], revision + 1) }
    }
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
    /// Each check is one linearizable transaction per quiet watch stream (a Range per prefix,
    /// 128 to a transaction); a stuck stream is found within two of them.
    static let stallCheckInterval: Duration = .seconds(30)
}
