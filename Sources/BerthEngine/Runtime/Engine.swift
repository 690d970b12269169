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
        /// Per frontend name: the address asked for, the address bound (port 0 resolved), and
        /// the group's sockets (owned by the workers, or by an install message on its way to
        /// them: open while they are listed here; the takeover sends duplicates of them).
        var listening: [String: ListenerGroup] = [:]
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
        public var listening: [String: SocketAddress] = [:]
        public var failures: [String: SystemError] = [:]
    }

    /// Replaces the routing table, live: new frontends start listening (one SO_REUSEPORT socket
    /// per worker, bound here so that errors are reported synchronously), removed ones stop
    /// accepting, backend sets change for new connections only. Connections to removed backends
    /// or frontends drain (they run to their end or `drainTimeout`).
    public func apply(_ table: RoutingTable) throws(EngineError) -> ApplyResult {
        try control.withLock { state throws(EngineError) -> ApplyResult in
            guard !state.stopped else { throw EngineError.stopped }
            let previous = state.published
            if let problem = table.validationError(checking: { previous?.frontend(named: $0.name) != $0 }) {
                throw EngineError.invalidTable(problem)
            }
            var result = ApplyResult()
            var handoffs = Array(repeating: [String: [CInt]](), count: handles.count)
            var served: [Frontend] = []
            var listening: [String: ListenerGroup] = [:]
            for frontend in table.frontends {
                // Unchanged when asked for the same address, or for the address it is bound to
                // (a caller that asked for port 0 may pass the port it got). Rebinding would close
                // the old sockets and reset the connections waiting in their accept queues.
                if let current = state.listening[frontend.name], current.serves(frontend.listen) {
                    listening[frontend.name] = current
                } else {
                    do throws(SystemError) {
                        var group: ListenerGroup
                        if let adopted = takeAdopted(frontend.listen, from: &state.adopted) {
                            group = adopted
                        } else {
                            group = try openListenerGroup(frontend.listen, count: handles.count)
                        }
                        for (index, fds) in group.distribute(over: handles.count).enumerated() where !fds.isEmpty {
                            handoffs[index][frontend.name] = fds
                        }
                        listening[frontend.name] = group
                    } catch {
                        result.failures[frontend.name] = error
                        continue
                    }
                }
                result.listening[frontend.name] = listening[frontend.name]!.bound
                if state.cursors[frontend.name] == nil { state.cursors[frontend.name] = RoundRobinCursor() }
                served.append(frontend)
            }
            if served.contains(where: \.settings.logConnections) { shared.connectionLog?.start() }
            state.listening = listening
            state.cursors = state.cursors.filter { listening[$0.key] != nil }
            // A backend keeps its counter while it stays in a leastconn frontend; sessions hold
            // the counter they added to, so one dropped here is still decremented correctly.
            var loads: [String: [String: BackendLoad]] = [:]
            for frontend in served where frontend.settings.balance == .leastConn {
                var current: [String: BackendLoad] = [:]
                for backend in frontend.backends {
                    current[backend.name] = state.loads[frontend.name]?[backend.name] ?? BackendLoad()
                }
                loads[frontend.name] = current
            }
            state.loads = loads
            state.revision = table.revision
            let published = PublishedTable(
                table: RoutingTable(revision: table.revision, frontends: served), cursors: state.cursors, loads: loads,
                previous: previous)
            state.published = published
            for (index, handle) in handles.enumerated() {
                handle.post(.install(published, listeners: handoffs[index]))
            }
            return result
        }
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
