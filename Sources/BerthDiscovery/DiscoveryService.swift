import BerthEngine
import BerthRegistry
import BerthSystem
import BerthEtcd
import BerthHealth
import Logging
import Synchronization

/// How discovery turns the registry into routing tables.
public struct DiscoverySettings: Sendable {
    public var catalog: Catalog.Options
    /// Listen host of every service (`--bind`); the port comes from the registry.
    public var bind: SocketAddress
    /// Frontend settings that a service's `_config` overrides.
    public var defaults: FrontendSettings
    /// Check settings that a service's `_config` `check` overrides (nil: HAProxy's defaults).
    public var checkDefaults: CheckSettings?
    /// A service whose listener could not open (port in use) is tried again this often.
    public var listenRetryInterval: Duration = .seconds(5)
    /// Deletions of leased instances that arrive right after an etcd outage
    /// (`WatchBatch.afterOutage`) take effect this long later (ms), unless their key is put
    /// again meanwhile: when this host
    /// or the registrars were cut off from etcd for longer than the lease TTL, etcd expired every
    /// registrar's lease, and each registrar puts its keys back under a new lease as soon as it
    /// reaches etcd again. Applied at once, those expiries would empty services of working
    /// backends until then (HAProxy's `hold obsolete` for the same reason). 0: no hold.
    public var outageHold: Int64 = 5_000
    /// Before listing again after the watch fell behind a compaction: a random wait from 0 to
    /// this many ms, so that a fleet cut off together does not list at the same instant (each
    /// listing is a Range of the whole prefix). The last table is served meanwhile.
    public var relistJitter: Int64 = 1_000
    /// Called with each etcd revision the routing comes to reflect: after each table the router
    /// accepted (the revision it was built from), and after a watch batch that changed nothing
    /// routable (a put of the value already held), whose revision the table now reflects too.
    /// Under discovery's lock: it must only hand the value on. `bench --scenarios fleet` reads
    /// when each host applied each revision through `--revision-log`.
    public var onApplied: (@Sendable (Int64) -> Void)?

    public init(catalog: Catalog.Options = .init(), bind: SocketAddress, defaults: FrontendSettings = .init(), checkDefaults: CheckSettings? = nil) {
        self.catalog = catalog
        self.bind = bind
        self.defaults = defaults
        self.checkDefaults = checkDefaults
    }
}

/// What discovery knows about etcd and the catalog, for the stats page and logs.
public struct DiscoveryStatus: Sendable {
    public var endpoint: String
    /// Whether a watch stream is established now (and its endpoint has not failed since).
    public var connected: Bool
    /// The revision the routing table reflects: that of the last table applied, or of a later
    /// watch batch that changed nothing routable (a batch folded into the catalog waits for the
    /// publisher's table before it counts).
    public var appliedRevision: Int64
    /// Seconds since the last watch event (nil: none yet).
    public var secondsSinceLastEvent: Double?
    /// Malformed keys and values skipped since start, and the latest of them.
    public var skippedValues: UInt64
    public var recentSkipped: [String]
    public var services: Int
    public var instances: Int
    /// Services or instances left out of the table, with the reason.
    public var problems: [String]
    /// Services whose listener failed to open (retried), with the reason.
    public var listenerFailures: [String: String]
    /// Full listings: the first, and one per compaction past the watch.
    public var listings: UInt64
    public var failovers: UInt64
}

/// Discovery: lists the registry prefix at revision R, watches from R + 1, folds each event
/// into the `Catalog`, and publishes every change to the `HealthRouter` as a new routing table
/// stamped with the etcd revision. Compaction past the watch: list again (the catalog's reset
/// drops what disappeared). etcd unreachable: the last table keeps serving; the loop retries.
///
/// Threads: `run()` on any task; the catalog is behind one lock, and a table is built and
/// applied under it, so tables reach the engine in revision order whoever publishes (the watch,
/// the linger/retry timer, or the resolver's thread when a host name changes address).
public final class DiscoveryService: Sendable {
    public let client: EtcdClient
    public let router: HealthRouter
    public let settings: DiscoverySettings
    public let resolver: HostResolver
    private let logger: Logger
    private let state: Mutex<State>

    private struct State {
        var catalog: Catalog
        var connected = false
        var lastEvent: ContinuousClock.Instant?
        var listings: UInt64 = 0
        var problems: [String] = []
        var listenerFailures: [String: String] = [:]
        var nextEvaluation: Int64?
        var lastProblems: Set<String> = []
        var lastSkipped: UInt64 = 0
        /// Revisions of the events applied, oldest first (bounded), for tests and debugging.
        var history: [Int64] = []
        /// Deletions held after an outage (`DiscoverySettings.outageHold`): key → when to apply.
        var heldDeletes: [String: Int64] = [:]
        /// The catalog changed since the last table was published: the publisher's next turn
        /// builds one table for every batch folded in meanwhile.
        var unpublished = false
        /// The revision the engine's routing reflects: the last table applied (or a later batch
        /// that changed nothing routable). The catalog's may be ahead while a table is pending.
        var appliedRevision: Int64 = 0
        /// Wakes the publisher of the running `run()` (at most one wake-up waits).
        var publisher: AsyncStream<Void>.Continuation?
        /// Wakes the timer of the running `run()` when it has work (at most one wake-up waits).
        var timer: AsyncStream<Void>.Continuation?

        /// Whether anything waits on the clock: a held deletion, a service whose table changes
        /// with time (lingering, slow start), a listener to retry. Without, the timer sleeps
        /// until woken: an idle host's wake-ups add up across a fleet.
        var hasTimedWork: Bool { !heldDeletes.isEmpty || nextEvaluation != nil || !listenerFailures.isEmpty }

        /// Wakes the timer when there is something for it.
        func wakeTimerIfNeeded() {
            if hasTimedWork { timer?.yield() }
        }
    }

    static let historyLimit = 100_000

    public init(client: EtcdClient, router: HealthRouter, settings: DiscoverySettings,
                resolver: HostResolver = HostResolver(), logger: Logger = Logger(label: "berth.discovery")) {
        self.client = client
        self.router = router
        self.settings = settings
        self.resolver = resolver
        self.logger = logger
        self.state = Mutex(State(catalog: Catalog(options: settings.catalog)))
        resolver.onChange { [weak self] _, _ in self?.publish() }
    }

    /// Lists and watches until cancelled. Throws only `CancellationError`, or
    /// `EtcdError.authenticationFailed` when etcd refuses the credentials.
    public func run() async throws {
        let ranges = settings.catalog.watchRanges
        var backoff = Backoff(client.configuration.backoff)
        let (requests, requester) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let (wakes, waker) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        state.withLock {
            $0.publisher = requester
            $0.timer = waker
            $0.wakeTimerIfNeeded()
        }
        let timer = Task { [weak self] in await self?.runTimer(wakes) }
        let publisher = Task { [weak self] in await self?.runPublisher(requests) }
        defer {
            timer.cancel()
            publisher.cancel()
            requester.finish()
            waker.finish()
            state.withLock {
                $0.publisher = nil
                $0.timer = nil
            }
            resolver.stop()
        }
        while true {
            try Task.checkCancellation()
            do {
                let listing = try await client.get(prefixes: ranges)
                reset(with: listing)
                backoff.reset()
                try await watch(ranges, from: listing.revision + 1)
            } catch let error as EtcdError {
                setDisconnected()
                switch error {
                case .compacted, .watchBehind:
                    let wait = settings.relistJitter > 0 ? Int64.random(in: 0...settings.relistJitter) : 0
                    if case .compacted(let revision) = error {
                        // (A listing of several ranges, pinned to a revision compacted meanwhile, too.)
                        logger.warning("the watch fell behind etcd's compaction: listing again in \(wait) ms", metadata: ["compacted": "\(revision)"])
                    } else {
                        logger.warning("\(error): listing again in \(wait) ms")
                    }
                    if wait > 0 { try await Task.sleep(for: .milliseconds(wait)) }
                    continue
                case .authenticationFailed:
                    throw error
                default:
                    logger.warning("etcd: \(error); serving the last table, retrying")
                    try await backoff.wait()
                }
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                setDisconnected()
                logger.warning("etcd: \(error); serving the last table, retrying")
                try await backoff.wait()
            }
        }
    }

    /// Watches every range from `revision` on, on one stream (with `--services`, a watch for
    /// each of the host's services and one for `_config`), until it throws (a compaction
    /// passed it, ...).
    private func watch(_ ranges: [String], from revision: Int64) async throws {
        try await client.watch(
            prefixes: ranges, fromRevision: revision,
            onConnected: { [weak self] endpoint in self?.connected(endpoint, ranges: ranges.count) },
            onBatch: { [weak self] batch in self?.apply(batch) })
    }

    public var status: DiscoveryStatus {
        let etcd = client.status
        return state.withLock { state in
            DiscoveryStatus(
                endpoint: etcd.endpoint, connected: state.connected && etcd.connected, appliedRevision: state.appliedRevision,
                secondsSinceLastEvent: state.lastEvent.map { Double(($0.duration(to: .now)) / .milliseconds(1)) / 1000 },
                skippedValues: state.catalog.malformed.total,
                recentSkipped: state.catalog.malformed.recent.map(\.description),
                services: state.catalog.services.count, instances: state.catalog.instanceCount,
                problems: state.problems, listenerFailures: state.listenerFailures,
                listings: state.listings, failovers: etcd.failovers)
        }
    }

    /// Revisions of the watch events applied so far (the last 100,000), in order.
    public func appliedRevisions() -> [Int64] {
        state.withLock { Array($0.history.suffix(Self.historyLimit)) }
    }

    /// A copy of the catalog (tests compare it with etcd).
    public var catalog: Catalog {
        state.withLock { $0.catalog }
    }

    // MARK: - Applying

    private func reset(with listing: RangeResult) {
        state.withLock { state in
            // A full listing is what etcd holds now: nothing is held against it.
            state.heldDeletes = [:]
            let diff = state.catalog.reset(entries: listing.keyValues.map { ($0.key, $0.value) }, revision: listing.revision)
            state.listings += 1
            if state.listings > 1 {
                logger.info("registry listed again", metadata: [
                    "revision": "\(listing.revision)", "added": "\(diff.added.count)",
                    "changed": "\(diff.changed.count)", "removed": "\(diff.removed.count)"])
            }
            publish(&state)
        }
        logger.info("registry listed", metadata: ["revision": "\(listing.revision)", "keys": "\(listing.keyValues.count)"])
    }

    private func apply(_ batch: WatchBatch) {
        state.withLock { state in
            let holdUntil = MonotonicClock.milliseconds() + settings.outageHold
            var events: [Catalog.Event] = []
            var held = 0
            for event in batch.events {
                let key = event.keyValue.key
                switch event.kind {
                case .put:
                    state.heldDeletes.removeValue(forKey: key)
                    events.append(.put(key: key, value: event.keyValue.value, revision: event.keyValue.modRevision))
                case .delete:
                    // Only keys that lived under a lease: an expiry looks like that, while a
                    // key deleted by hand (or written without a lease) goes at once.
                    let leased = (event.previous?.lease ?? 0) != 0
                    if batch.afterOutage && leased && settings.outageHold > 0 && state.catalog.holdsInstance(key) {
                        state.heldDeletes[key] = holdUntil
                        held += 1
                    } else {
                        state.heldDeletes.removeValue(forKey: key)
                        events.append(.delete(key: key, revision: event.keyValue.modRevision))
                    }
                }
            }
            if held > 0 {
                state.wakeTimerIfNeeded()
                logger.info("registry: \(held) instance deletion(s) right after an etcd outage (lease expiries?) held for \(settings.outageHold) ms, unless put again")
            }
            let changed = state.catalog.apply(events)
            state.lastEvent = .now
            state.connected = true
            state.history.append(contentsOf: batch.events.map(\.keyValue.modRevision))
            // Trimmed in halves, not per batch: amortised O(1) under the lock once full.
            if state.history.count >= 2 * Self.historyLimit { state.history.removeFirst(state.history.count - Self.historyLimit) }
            if changed {
                state.unpublished = true
                if let publisher = state.publisher { publisher.yield() } else { publish(&state) }
            } else if !state.unpublished {
                state.appliedRevision = state.catalog.revision
                settings.onApplied?(state.catalog.revision)
            }
        }
    }

    /// Builds and applies a table whenever a watch batch changed the catalog. The batches that
    /// arrive while a table is being built share the next one: a host behind a burst of changes
    /// (or short of CPU) builds one table for all of them, not one per change.
    private func runPublisher(_ requests: AsyncStream<Void>) async {
        for await _ in requests {
            state.withLock { state in
                guard state.unpublished else { return }
                publish(&state)
            }
        }
    }

    private func connected(_ endpoint: EtcdEndpoint, ranges: Int) {
        state.withLock { $0.connected = true }
        var metadata: Logger.Metadata = ["endpoint": "\(endpoint)"]
        if ranges > 1 { metadata["ranges"] = "\(ranges)" }
        logger.info("watching the registry", metadata: metadata)
    }

    private func setDisconnected() {
        state.withLock { $0.connected = false }
    }

    /// Rebuilds and applies the table (from the timer and the resolver).
    func publish() {
        state.withLock { publish(&$0) }
    }

    private func publish(_ state: inout State) {
        state.unpublished = false
        let resolver = self.resolver
        let build = state.catalog.routingTable(
            bind: settings.bind, defaults: settings.defaults, checkDefaults: settings.checkDefaults,
            now: MonotonicClock.milliseconds(), resolve: { resolver.lookup($0) })
        resolver.track(build.hostNames)
        state.nextEvaluation = build.nextEvaluation
        state.problems = build.problems.map(\.description)
        let problems = Set(state.problems)
        for problem in problems.subtracting(state.lastProblems) { logger.warning("registry: \(problem)") }
        state.lastProblems = problems
        if state.catalog.malformed.total > state.lastSkipped {
            for entry in state.catalog.malformed.recent.suffix(Int(min(8, state.catalog.malformed.total - state.lastSkipped))) {
                logger.warning("registry: skipped a malformed entry: \(entry)")
            }
            state.lastSkipped = state.catalog.malformed.total
        }
        do {
            let result = try router.apply(build.table, checks: build.checks)
            state.appliedRevision = Int64(build.table.revision)
            settings.onApplied?(state.appliedRevision)
            let failures = result.failures.mapValues { "\($0)" }
            for (service, reason) in failures where state.listenerFailures[service] != reason {
                logger.error("service \(service): cannot listen: \(reason) (retrying)")
            }
            state.listenerFailures = failures
        } catch {
            logger.error("the routing table was refused: \(error)")
        }
        state.wakeTimerIfNeeded()
    }

    /// Republishes when a lingering service is due to close, and retries failed listeners.
    private func runTimer(_ wakes: AsyncStream<Void>) async {
        var lastRetry = ContinuousClock.now
        var woken = wakes.makeAsyncIterator()
        while !Task.isCancelled {
            // Nothing on the clock: sleep until something is (a wake-up sent meanwhile waits).
            if !state.withLock({ $0.hasTimedWork }) {
                guard await woken.next() != nil else { return }
                continue
            }
            try? await Task.sleep(for: .milliseconds(200))
            let (due, failing) = state.withLock { state in
                let now = MonotonicClock.milliseconds()
                // Held deletions whose keys did not come back take effect now.
                let expired = state.heldDeletes.filter { $0.value <= now }.map(\.key)
                var removed = false
                for key in expired {
                    state.heldDeletes.removeValue(forKey: key)
                    removed = state.catalog.remove(key: key).changesCatalog || removed
                }
                if !expired.isEmpty {
                    logger.info("registry: \(expired.count) held deletion(s) applied (their keys did not come back)")
                }
                return (removed || (state.nextEvaluation.map { now >= $0 } ?? false), !state.listenerFailures.isEmpty)
            }
            if due || (failing && ContinuousClock.now - lastRetry >= settings.listenRetryInterval) {
                lastRetry = .now
                publish()
            }
        }
    }
}
