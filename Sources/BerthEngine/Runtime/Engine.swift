import BerthSystem
import Glibc
import Synchronization

/// The data plane: N worker threads relaying TCP connections for the frontends of the routing
/// table most recently applied.
///
/// Threads: `apply`, `statistics` and `shutdown` may be called from any thread (the control
/// plane); each worker picks up a new table on its own thread after an eventfd wake, so nothing
/// on the per-connection path takes a lock.
public final class Engine: Sendable {
    public let configuration: EngineConfiguration
    let handles: [WorkerHandle]
    private let shared: EngineShared
    /// With `configuration.connectionLog`: the rings and the writer.
    public var connectionLog: ConnectionLog? { shared.connectionLog }
    let control: Mutex<ControlState>

    struct ControlState: ~Copyable {
        /// Per frontend served (in the order of `published`'s table): the address asked for, the
        /// address bound (port 0 resolved), and the group's sockets (owned by the workers, or by
        /// an install message on its way to them: open while they are listed here; the takeover
        /// sends duplicates of them).
        var groups: [ListenerGroup] = []
        /// Sockets handed over by a previous process (`adopt`), not yet taken by a frontend.
        var adopted: [ListenerGroup] = []
        var cursors: [String: RoundRobinCursor] = [:]
        /// Per leastconn frontend, per backend name: open connections over every worker.
        var loads: [String: [String: BackendLoad]] = [:]
        var threads: [pthread_t] = []
        var revision: UInt64 = 0
        var stopped = false
        /// The table last published: its frontends are not validated again, and their balancing
        /// plans are reused, while a new table gives them unchanged.
        var published: PublishedTable?
        /// The serial of the table `published` was made from (0: none, or not told).
        var appliedSerial: UInt64 = 0
        /// Tables applied by their changes (tests).
        var appliedByChanges = 0
        /// `published`'s frontends are in ascending order of name: a table with `changes`
        /// relative to it can be applied by those alone.
        var ascending = false
        /// The frontends of the last table given that could not listen: tried again by the next
        /// table, whatever its changes say.
        var failed: [String] = []
        /// Which frontend listens on each address (port 0 left out), for a table applied by
        /// its changes; nil until one is.
        var addresses: [SocketAddress: String]?

        /// The listener groups by frontend name.
        var listening: [String: ListenerGroup] {
            guard let published else { return [:] }
            return Dictionary(uniqueKeysWithValues: zip(published.table.frontends.map(\.name), groups))
        }
    }

    /// Starts the workers. They serve nothing until `apply` gives them a table.
    public init(configuration: EngineConfiguration = .init()) throws(SystemError) {
        precondition(configuration.workers >= 1, "at least one worker")
        ignoreBrokenPipeSignal()
        self.configuration = configuration
        var handles: [WorkerHandle] = []
        for index in 0..<configuration.workers { handles.append(try WorkerHandle(index: index)) }
        self.handles = handles
        shared = EngineShared(connectionLog: configuration.connectionLog.map { ConnectionLog(settings: $0, workers: configuration.workers) })
        control = Mutex(ControlState())
        let shared = self.shared
        var threads: [pthread_t] = []
        for handle in handles {
            // The worker is created on its own thread and never leaves it.
            let ready = Atomic<Int>(0)
            let failure = Mutex<SystemError?>(nil)
            let thread = OSThread(name: "berth-worker-\(handle.index)") {
                do throws(SystemError) {
                    let worker = try Worker(handle: handle, configuration: configuration, shared: shared, io: SystemSockets())
                    ready.store(1, ordering: .releasing)
                    worker.run()
                } catch {
                    failure.withLock { $0 = error }
                    ready.store(2, ordering: .releasing)
                }
            }
            while ready.load(ordering: .acquiring) == 0 { sched_yield() }
            threads.append(thread.handle)
            if let error = failure.withLock({ $0 }) {
                for other in handles { other.post(.stop(deadline: 0)) }
                for started in threads { pthread_join(started, nil) }
                throw error
            }
        }
        control.withLock { $0.threads = threads }
    }

    /// The outcome of `apply`: where each frontend listens, and the frontends that could not
    /// listen (they are left out of the table; the others are served).
    public struct ApplyResult: Sendable {
        /// The frontends served and their listener groups, in the same order (made into
        /// `listening` when asked).
        var served: [Frontend] = []
        var groups: [ListenerGroup] = []
        public var failures: [String: SystemError] = [:]

        public var listening: [String: SocketAddress] {
            Dictionary(uniqueKeysWithValues: zip(served.lazy.map(\.name), groups.lazy.map(\.bound)))
        }
    }

    /// Replaces the routing table, live: new frontends start listening (one SO_REUSEPORT socket
    /// per worker, bound here so that errors are reported synchronously), removed ones stop
    /// accepting, backend sets change for new connections only. Connections to removed backends
    /// or frontends drain (they run to their end or `drainTimeout`).
    ///
    /// A frontend given as in the last table costs no more than finding it there (see
    /// `NameMatcher`): it is not validated again, and keeps its listener and balancing plan.
    ///
    /// A table with `changes` relative to the one published last (in ascending order of name)
    /// costs only the frontends named there, and those that could not listen last time.
    public func apply(_ table: RoutingTable) throws(EngineError) -> ApplyResult {
        try control.withLock { state throws(EngineError) -> ApplyResult in
            guard !state.stopped else { throw EngineError.stopped }
            if let changes = table.changes, state.published != nil, state.ascending,
               state.appliedSerial != 0, changes.base == state.appliedSerial {
                return try applyChanges(table, changes.names, &state)
            }
            let previous = state.published
            let before = previous?.table.frontends ?? []
            var matcher = NameMatcher(previous: before.map(\.name))
            let positions = table.frontends.map { matcher.position(of: $0.name) }
            if let problem = Self.validationError(of: table, previous: before, positions: positions) {
                throw EngineError.invalidTable(problem)
            }
            var result = ApplyResult()
            var handoffs = Array(repeating: [String: [CInt]](), count: handles.count)
            var served: [Frontend] = []
            served.reserveCapacity(table.frontends.count)
            var servedPositions: [Int?] = []
            servedPositions.reserveCapacity(table.frontends.count)
            var groups: [ListenerGroup] = []
            groups.reserveCapacity(table.frontends.count)
            for (frontend, position) in zip(table.frontends, positions) {
                // Unchanged when asked for the same address, or for the address it is bound to
                // (a caller that asked for port 0 may pass the port it got). Rebinding would close
                // the old sockets and reset the connections waiting in their accept queues.
                if let position, state.groups[position].serves(frontend.listen) {
                    groups.append(state.groups[position])
                } else {
                    do throws(SystemError) {
                        groups.append(try listen(frontend, &state, handoffs: &handoffs))
                    } catch {
                        result.failures[frontend.name] = error
                        continue
                    }
                }
                if position == nil && state.cursors[frontend.name] == nil { state.cursors[frontend.name] = RoundRobinCursor() }
                served.append(frontend)
                servedPositions.append(position)
            }
            if served.contains(where: \.settings.logConnections) { shared.connectionLog?.start() }
            state.groups = groups
            // Every served frontend has a cursor: more cursors than frontends, some left.
            if state.cursors.count != served.count {
                let names = Set(served.map(\.name))
                state.cursors = state.cursors.filter { names.contains($0.key) }
            }
            // A backend keeps its counter while it stays in a leastconn frontend; sessions hold
            // the counter they added to, so one dropped here is still decremented correctly.
            var loads: [String: [String: BackendLoad]] = [:]
            for frontend in served where frontend.settings.balance == .leastConn {
                loads[frontend.name] = Self.loads(of: frontend, kept: state.loads[frontend.name])
            }
            state.loads = loads
            state.revision = table.revision
            let published = PublishedTable(
                table: RoutingTable(revision: table.revision, frontends: served, serial: RoutingTable.makeSerial()),
                cursors: state.cursors, loads: loads, previous: previous, previousPositions: servedPositions)
            state.published = published
            state.appliedSerial = table.serial
            state.ascending = zip(served, served.dropFirst()).allSatisfy { $0.name < $1.name }
            state.failed = result.failures.keys.sorted()
            state.addresses = nil
            for (index, handle) in handles.enumerated() {
                handle.post(.install(published, listeners: handoffs[index]))
            }
            result.served = served
            result.groups = groups
            return result
        }
    }

    /// `apply` of a table by its changes: only the frontends named (and those that failed to
    /// listen last time) are looked at; the others stay as published, listeners and plans
    /// included. The workers get the same changes. Refused as a whole, changing nothing, when a
    /// changed frontend breaks a rule or takes an address another one listens on.
    private func applyChanges(_ table: RoutingTable, _ changed: [String], _ state: inout ControlState) throws(EngineError) -> ApplyResult {
        var names = changed
        if !state.failed.isEmpty { names = Array(Set(names).union(state.failed)).sorted() }
        let (wanted, addresses) = try validateChanges(table, names, &state)
        return applyValidated(table, wanted, addresses: addresses, &state)
    }

    /// What `applyChanges` changes (each frontend named, with its frontend and balancing plan as
    /// published, nil when new), unless the table is refused; and the listen addresses after it.
    private func validateChanges(_ table: RoutingTable, _ names: [String], _ state: inout ControlState)
        throws(EngineError) -> (wanted: [ChangedFrontend], addresses: [SocketAddress: String]) {
        let previous = state.published!
        let frontends = previous.table.frontends
        // Validate first. Addresses: those of the changed frontends are released, then taken
        // again one by one; a second taker is refused.
        // Taken out so that it changes in place; left nil (made again next time) if refused.
        var addresses = state.addresses ?? Dictionary(
            frontends.lazy.filter { $0.listen.port != 0 }.map { ($0.listen, $0.name) }, uniquingKeysWith: { first, _ in first })
        state.addresses = nil
        var wanted: [ChangedFrontend] = []
        wanted.reserveCapacity(names.count)
        for name in names {
            let (index, found) = table.search(name)
            let frontend = found ? table.frontends[index] : nil
            let (position, held) = frontends.searchByName(name) { $0.name }
            if held ? frontend == frontends[position] : frontend == nil { continue }
            if let frontend {
                if frontend.name.isEmpty { throw EngineError.invalidTable("a frontend has an empty name") }
                if let problem = frontend.validationError() { throw EngineError.invalidTable(problem) }
            }
            if held, frontends[position].listen.port != 0, addresses[frontends[position].listen] == name {
                addresses.removeValue(forKey: frontends[position].listen)
            }
            wanted.append(ChangedFrontend(name: name, frontend: frontend, before: held ? previous.plan(at: position) : nil))
        }
        for entry in wanted {
            guard let frontend = entry.frontend, frontend.listen.port != 0 else { continue }
            if let holder = addresses.updateValue(entry.name, forKey: frontend.listen), holder != entry.name {
                throw EngineError.invalidTable("two frontends listen on \(frontend.listen)")
            }
        }
        return (wanted, addresses)
    }

    /// A frontend `applyChanges` changes: nil when it goes; `before`, its frontend and plan as
    /// published, nil when new.
    private struct ChangedFrontend {
        var name: String
        var frontend: Frontend?
        var before: (frontend: Frontend, schedule: [Int32]?, ring: HashRing?)?
    }

    private func applyValidated(_ table: RoutingTable, _ wanted: [ChangedFrontend], addresses: [SocketAddress: String],
                                _ state: inout ControlState) -> ApplyResult {
        var addresses = addresses
        var result = ApplyResult()
        var handoffs = Array(repeating: [String: [CInt]](), count: handles.count)
        var groups = state.groups
        state.groups = []
        // The arrays of the table published before: changed in place when the workers are done
        // with it (the usual case), else copied.
        var previous = state.published!
        state.published = nil
        let baseSerial = previous.table.serial
        var (frontends, schedules, rings) = PublishedTable.surrender(&previous)
        var loads = state.loads
        state.loads = [:]
        var applied: [String] = []
        applied.reserveCapacity(wanted.count)
        // Out of the table: its listener closes on the workers, its connections drain.
        func remove(_ name: String, at position: Int, _ state: inout ControlState) {
            frontends.remove(at: position)
            groups.remove(at: position)
            schedules.remove(at: position)
            rings.remove(at: position)
            state.cursors.removeValue(forKey: name)
            loads.removeValue(forKey: name)
            applied.append(name)
        }
        for change in wanted {
            let (name, frontend, before) = (change.name, change.frontend, change.before)
            let (position, held) = frontends.searchByName(name) { $0.name }
            guard let frontend else {
                remove(name, at: position, &state)
                continue
            }
            let group: ListenerGroup
            if held && groups[position].serves(frontend.listen) {
                group = groups[position]
            } else {
                do throws(SystemError) {
                    group = try listen(frontend, &state, handoffs: &handoffs)
                } catch {
                    // Left out, like a frontend that cannot listen in a whole table.
                    result.failures[name] = error
                    if frontend.listen.port != 0, addresses[frontend.listen] == name { addresses.removeValue(forKey: frontend.listen) }
                    if held { remove(name, at: position, &state) }
                    continue
                }
            }
            let plan = PublishedTable.plan(frontend, previous: before)
            loads[name] = frontend.settings.balance == .leastConn ? Self.loads(of: frontend, kept: loads[name]) : nil
            if held {
                frontends[position] = frontend
                groups[position] = group
                schedules[position] = plan.schedule
                rings[position] = plan.ring
            } else {
                frontends.insert(frontend, at: position)
                groups.insert(group, at: position)
                schedules.insert(plan.schedule, at: position)
                rings.insert(plan.ring, at: position)
                if state.cursors[name] == nil { state.cursors[name] = RoundRobinCursor() }
            }
            if frontend.settings.logConnections { shared.connectionLog?.start() }
            applied.append(name)
        }
        state.groups = groups
        state.loads = loads
        state.addresses = addresses
        state.failed = result.failures.keys.sorted()
        state.revision = table.revision
        let published = PublishedTable(
            table: RoutingTable(revision: table.revision, frontends: frontends, serial: RoutingTable.makeSerial(),
                                changes: FrontendChanges(base: baseSerial, names: applied)),
            cursors: state.cursors, loads: loads, schedules: schedules, rings: rings)
        state.published = published
        state.appliedSerial = table.serial
        state.appliedByChanges += 1
        for (index, handle) in handles.enumerated() {
            handle.post(.install(published, listeners: handoffs[index]))
        }
        result.served = frontends
        result.groups = groups
        return result
    }

    /// The listener group of a frontend that is new or moved: sockets handed over by a
    /// previous process for its address, else bound now; each worker's share goes in
    /// `handoffs` (the workers own them from there).
    private func listen(_ frontend: Frontend, _ state: inout ControlState,
                        handoffs: inout [[String: [CInt]]]) throws(SystemError) -> ListenerGroup {
        let group: ListenerGroup
        if let adopted = takeAdopted(frontend.listen, from: &state.adopted) {
            group = adopted
        } else {
            group = try openListenerGroup(frontend.listen, count: handles.count)
        }
        for (index, fds) in group.distribute(over: handles.count).enumerated() where !fds.isEmpty {
            handoffs[index][frontend.name] = fds
        }
        return group
    }

    /// A leastconn frontend's counters: a backend keeps its counter (`kept`) while it stays.
    private static func loads(of frontend: Frontend, kept: [String: BackendLoad]?) -> [String: BackendLoad] {
        var loads: [String: BackendLoad] = [:]
        for backend in frontend.backends { loads[backend.name] = kept?[backend.name] ?? BackendLoad() }
        return loads
    }

    /// `table.validationError()`, skipping what the previous table (already valid) settles: the
    /// rules of each frontend given unchanged; the names' uniqueness when they are in ascending
    /// order; the listen addresses' when no frontend is new or moved.
    private static func validationError(of table: RoutingTable, previous: [Frontend], positions: [Int?]) -> String? {
        var ascending = true
        var moved = false
        for (index, frontend) in table.frontends.enumerated() {
            if frontend.name.isEmpty { return "a frontend has an empty name" }
            if index > 0 && !(table.frontends[index - 1].name < frontend.name) { ascending = false }
            guard let position = positions[index], previous[position].listen == frontend.listen else {
                moved = true
                if let problem = frontend.validationError() { return problem }
                continue
            }
            if previous[position] != frontend, let problem = frontend.validationError() { return problem }
        }
        if ascending && !moved { return nil }
        return table.validationError(checking: { _ in false })
    }

    /// Binds one socket per worker to `address` (the first decides the port when it is 0).
    /// Closes all of them if any fails.
    private func openListenerGroup(_ address: SocketAddress, count: Int) throws(SystemError) -> ListenerGroup {
        var fds: [CInt] = []
        var bound = address
        do throws(SystemError) {
            for _ in 0..<count {
                fds.append(try Self.openListener(bound))
                if fds.count == 1 && address.port == 0 { bound = try Sockets.localAddress(fds[0]) }
            }
        } catch {
            for fd in fds { closeDescriptor(fd) }
            throw error
        }
        return ListenerGroup(requested: address, bound: bound, fds: fds)
    }

    /// One more SO_REUSEPORT socket of a group at `address`, as a raw fd the caller owns.
    static func openListener(_ address: SocketAddress) throws(SystemError) -> CInt {
        var socket = try Sockets.listen(on: address, reusePort: true)
        // Accepted sockets inherit TCP_NODELAY: one system call per listener, not per client.
        Sockets.setNoDelay(socket.raw)
        return socket.release()
    }

    /// Stops accepting on every frontend, lets open connections finish for up to `drainTimeout`
    /// ms (default: the configuration's), closes what is left, and joins the worker threads.
    public func shutdown(drainTimeout: Int64? = nil) {
        let threads: [pthread_t] = control.withLock { state in
            if state.stopped { return [] }
            state.stopped = true
            let threads = state.threads
            state.threads = []
            return threads
        }
        let deadline = Deadline.after(drainTimeout ?? configuration.drainTimeout, from: MonotonicClock.milliseconds())
        for handle in handles { handle.post(.stop(deadline: deadline)) }
        for thread in threads { pthread_join(thread, nil) }
        if !threads.isEmpty { shared.connectionLog?.stop() }
    }

    /// An engine dropped without `shutdown` stops at once (its threads must not outlive it).
    deinit {
        shutdown(drainTimeout: 0)
    }

    /// Where each frontend listens now (port 0 resolved), by frontend name.
    public func listeningAddresses() -> [String: SocketAddress] {
        control.withLock { state in state.listening.mapValues(\.bound) }
    }

    /// Client connections open now, over all workers.
    public var openConnections: Int { shared.connections.load(ordering: .relaxed) }

    /// Sums every worker's counters.
    public func statistics() -> EngineStatistics {
        var statistics = EngineStatistics()
        statistics.revision = control.withLock { $0.revision }
        if let log = shared.connectionLog {
            statistics.connectionLogWritten = log.writtenRecords
            statistics.connectionLogDropped = log.droppedRecords
        }
        for handle in handles {
            statistics.sessionsPerWorker.append(handle.registry.sessions.load(ordering: .relaxed))
            statistics.pipesInUse.append(handle.registry.pipesInUse.load(ordering: .relaxed))
            statistics.acceptPauses += handle.registry.acceptPauses.load(ordering: .relaxed)
            statistics.loopErrors += handle.registry.loopErrors.load(ordering: .relaxed)
            let entries = handle.registry.entries.withLock { $0 }
            for (key, counters) in entries {
                var frontend = statistics.frontends[key.frontend] ?? FrontendStatistics()
                if let backend = key.backend {
                    var traffic = frontend.backends[backend] ?? TrafficSnapshot()
                    traffic.accumulate(counters.snapshot)
                    frontend.backends[backend] = traffic
                } else {
                    frontend.traffic.accumulate(counters.snapshot)
                }
                statistics.frontends[key.frontend] = frontend
            }
        }
        return statistics
    }
}

public enum EngineError: Error, CustomStringConvertible, Sendable {
    case invalidTable(String)
    case stopped

    public var description: String {
        switch self {
        case .invalidTable(let reason): "invalid routing table: \(reason)"
        case .stopped: "the engine is stopped"
        }
    }
}
