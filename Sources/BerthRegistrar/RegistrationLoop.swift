import Logging

/// The registrar's state and every change to it. Owned by the one task that runs
/// `Registrar.process` (not Sendable, never shared): Docker events, resyncs and lease checks are
/// applied one at a time, in arrival order, so a late inspect can never undo a newer event.
///
/// The model: `containers` (what Docker says runs here) + `configuration.statics` (`--static`)
/// + `fileStatics` (`--static-file`, replaced on reload) → `desired` (key → value);
/// `written` is what this lease holds in etcd as far as we know. `sync()` writes the difference.
/// A failed write leaves `dirty` set and the next tick retries; a lost lease empties `written`,
/// so the next sync grants a new lease and puts every key again.
final class RegistrationLoop {
    private struct Entry {
        var info: ContainerInfo
        var registrations: [Registration]
    }

    let configuration: RegistrarConfiguration
    let store: any RegistrationStore
    let logger: Logger
    /// Where the lease keeper reads the lease id, and the stats page the figures.
    let shared: RegistrarShared

    private var containers: [String: Entry] = [:]
    /// The `--static-file` entries: those read at start-up, then those of the last valid reload.
    private var fileStatics: [Registration]
    /// Containers sent a terminating signal (kill, stop): drained until they die, or until a resync
    /// finds them still running after `resyncInterval` (the signal was ignored).
    private var drainingSince: [String: ContinuousClock.Instant] = [:]
    private var lease: Int64?
    private var written: [String: String] = [:]
    private(set) var dirty = true
    /// The last resync could not list containers: the next tick tries again.
    private(set) var resyncPending = false
    private var lastFailure: String?

    /// Deadline of one etcd call, so an unreachable etcd cannot stall event handling.
    static let storeTimeout: Duration = .seconds(2)

    init(configuration: RegistrarConfiguration, store: any RegistrationStore, logger: Logger, shared: RegistrarShared) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        self.shared = shared
        fileStatics = configuration.fileStatics
        if let adopted = configuration.adoptedLease {
            // Every desired key is put again under it at the first sync (same values: watchers
            // see puts, never a delete).
            lease = adopted
            shared.setLease(adopted)
            logger.info("lease \(adopted) adopted from the previous process")
        }
    }

    // MARK: - Docker

    func handle(_ event: DockerEvent, docker: DockerClient) async {
        let id = event.containerID
        switch event.action {
        case .start, .unpause, .pause, .healthStatus:
            if case .start = event.action { drainingSince[id] = nil }
            await refresh(id: id, docker: docker)
        case .kill(let signal):
            if containers[id] != nil, DockerEventParser.isTerminating(signal: signal), drainingSince[id] == nil {
                drainingSince[id] = .now
            }
        case .die, .stop, .destroy:
            remove(id: id)
        }
        await sync()
    }

    /// Repairs the container table from `GET /containers/json` (both directions: missing
    /// containers are inspected and added, vanished ones removed), then checks etcd against what
    /// we believe we wrote. Docker unreachable: the table is kept as it is.
    func resync(docker: DockerClient?) async {
        if let docker {
            do {
                let running = try await docker.listContainers()
                let listed = Set(running.map(\.id))
                for id in containers.keys where !listed.contains(id) { remove(id: id) }
                for summary in running {
                    if let known = containers[summary.id], known.info.paused == summary.paused,
                       Set(known.info.ports) == summary.ports {
                        continue
                    }
                    await refresh(id: summary.id, docker: docker)
                }
                let stale = ContinuousClock.now - configuration.resyncInterval
                for (id, since) in drainingSince where since < stale || containers[id] == nil { drainingSince[id] = nil }
                shared.update { $0.resyncs += 1 }
                resyncPending = false
            } catch {
                if !resyncPending { logger.warning("resync: cannot list containers: \(error); retrying every tick") }
                resyncPending = true
            }
        }
        await verifyStore()
        await sync()
    }

    private func refresh(id: String, docker: DockerClient) async {
        do {
            let info = try await docker.inspect(id: id)
            guard info.running else {
                remove(id: id)
                return
            }
            let (registrations, warnings) = RegistrationRules.registrations(for: info, hostIP: configuration.hostIP)
            for warning in warnings { logger.warning("\(warning)") }
            if containers[id] == nil && !registrations.isEmpty {
                logger.info("container \(info.shortID) (\(info.name)): \(registrations.map { "\($0.service)=\($0.host):\($0.port)" }.joined(separator: ", "))")
            }
            containers[id] = Entry(info: info, registrations: registrations)
        } catch DockerError.notFound {
            remove(id: id)
        } catch {
            // Docker itself is failing: leave the table as it is; the resync after the event stream
            // reconnects repairs it.
            logger.warning("inspect \(id.prefix(12)): \(error)")
        }
        shared.update { $0.containers = containers.count }
    }

    private func remove(id: String) {
        if let entry = containers.removeValue(forKey: id), !entry.registrations.isEmpty {
            logger.info("container \(entry.info.shortID) (\(entry.info.name)) gone: deregistering")
        }
        drainingSince[id] = nil
        shared.update { $0.containers = containers.count }
    }

    // MARK: - Static services

    /// Replaces the `--static-file` entries and writes the difference (under the same lease:
    /// unchanged keys are not put again). Counts by service and instance: `added` are new or
    /// changed entries, `removed` those no longer in the file.
    func replaceFileStatics(_ entries: [Registration]) async -> (added: Int, removed: Int) {
        func identity(_ registration: Registration) -> [String] { [registration.service, registration.instance] }
        let previous = Dictionary(fileStatics.map { (identity($0), $0) }, uniquingKeysWith: { first, _ in first })
        let current = Set(entries.map(identity))
        let added = entries.filter { previous[identity($0)] != $0 }.count
        let removed = previous.keys.filter { !current.contains($0) }.count
        fileStatics = entries
        await sync()
        return (added, removed)
    }

    // MARK: - etcd

    /// Every key this host should hold, with its value.
    var desired: [String: String] {
        var registrations = configuration.statics + fileStatics
        for (id, entry) in containers {
            let draining = drainingSince[id] != nil
            for var registration in entry.registrations {
                if draining { registration.draining = true }
                registrations.append(registration)
            }
        }
        return configuration.layout.table(registrations)
    }

    /// Grants a lease if there is none, then writes the difference between `desired` and
    /// `written`. Stops at the first failure (etcd unreachable) and leaves `dirty` set.
    func sync() async {
        do {
            let leaseID: Int64
            if let lease {
                leaseID = lease
            } else {
                let ttl = configuration.ttlSeconds
                leaseID = try await call("grant lease") { [store] in try await store.grantLease(ttl: ttl) }
                lease = leaseID
                written = [:]
                shared.setLease(leaseID)
                logger.info("lease \(leaseID) granted (TTL \(ttl) s)")
            }
            let diff = RecordDiff(desired: desired, written: written)
            for (key, value) in diff.puts {
                try await call("put \(key)") { [store] in try await store.put(key: key, value: value, lease: leaseID) }
                written[key] = value
            }
            for key in diff.deletes {
                try await call("delete \(key)") { [store] in try await store.delete(key: key) }
                written[key] = nil
            }
            dirty = false
            if lastFailure != nil {
                logger.info("etcd writes succeed again")
                lastFailure = nil
            }
            shared.update { $0.etcdReachable = true }
        } catch {
            dirty = true
            let text = "\(error)"
            if lastFailure != text { logger.warning("etcd: \(text); retrying") }
            lastFailure = text
            shared.update { $0.etcdReachable = false }
        }
        shared.update { $0.registered = written.count }
    }

    /// The lease keeper saw `leaseID` expire (etcd restarted without its data, or we were cut
    /// off for longer than the TTL): forget it and write everything under a new one.
    func leaseLost(_ leaseID: Int64) async {
        guard lease == leaseID else { return }
        logger.warning("lease \(leaseID) is gone: granting a new one and registering again")
        lease = nil
        written = [:]
        shared.setLease(nil)
        await sync()
    }

    /// Reads our keys back: any that etcd lost or that someone changed is written again.
    private func verifyStore() async {
        guard lease != nil, !dirty, !written.isEmpty else { return }
        // Only our keys: a read of the whole prefix on every host at every resync would cost
        // etcd the registry's size × hosts / resync interval (about 9 MB/s for 200 hosts and
        // 10,000 instances at 30 s).
        let keys = Array(written.keys)
        do {
            let stored = try await call("read back \(keys.count) keys") { [store] in try await store.get(keys: keys) }
            for (key, value) in written where stored[key] != value {
                logger.info("\(key) changed or missing in etcd: writing it again")
                written[key] = nil
            }
        } catch {
            logger.warning("etcd: cannot read back this host's \(keys.count) keys: \(error)")
        }
    }

    /// Taken over: the successor keeps the lease alive and its keys; nothing is revoked.
    func handOver() {
        if let lease { logger.info("lease \(lease) and \(written.count) key(s) left to the successor") }
        lease = nil
        shared.setLease(nil)
    }

    /// SIGTERM path: revoking the lease removes every key at once.
    func revoke() async {
        guard let leaseID = lease else { return }
        do {
            try await call("revoke lease") { [store] in try await store.revokeLease(leaseID) }
            logger.info("lease \(leaseID) revoked: \(written.count) key(s) removed")
        } catch {
            logger.warning("cannot revoke lease \(leaseID) (\(error)); its keys expire within \(configuration.ttlSeconds) s")
        }
        lease = nil
        written = [:]
        shared.setLease(nil)
        shared.update { $0.registered = 0 }
    }

    private func call<Result: Sendable>(_ what: String, _ operation: @escaping @Sendable () async throws -> Result) async throws -> Result {
        try await withDeadline(Self.storeTimeout, what: what, operation)
    }
}
