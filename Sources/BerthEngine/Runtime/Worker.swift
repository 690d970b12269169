import BerthSystem
import Glibc
import Synchronization

/// One event loop thread: its own epoll instance, listeners, sessions, pipes, timers and counters.
/// Everything here runs on the worker's thread only (`assertOnLoop`); the control plane reaches it
/// through `WorkerHandle` alone. `IO` is the socket calls (`SystemSockets`, or the tests' harness).
final class Worker<IO: SocketIO> {
    let handle: WorkerHandle
    let configuration: EngineConfiguration
    let shared: EngineShared
    let io: IO
    /// Epoll, the wake-up and the timers (sessions' deadlines, by slot and generation).
    var loop: EventLoopCore
    var pipes: PipePool
    /// The copy path's buffer: one read at a time goes through it.
    let scratch: UnsafeMutableRawPointer
    var sessions = SlotTable<Session>()
    var activeSessions = 0
    var deferredSessions: [Session] = []
    private var deferredRound: [Session] = []
    /// In the order of the table installed last.
    var frontends: [FrontendRuntime] = []
    /// The serial of the table installed last: a table with changes relative to it is
    /// installed by those alone.
    var installedSerial: UInt64 = 0
    /// Counters of backends and frontends that left the table, still registered: dropped once
    /// no session holds them (`install`).
    var unprunedCounters = Set<CounterRegistry.Key>()
    /// Listening sockets and their frontends, indexed by listener token slot.
    var listenerSlots: [ListenerSlot?] = []
    var now: Int64 = MonotonicClock.milliseconds()
    var acceptPaused = false
    var acceptResumeAt: Int64 = .max
    var stopping = false
    var stopDeadline: Int64 = .max
    private let thread = pthread_self()

    init(handle: WorkerHandle, configuration: EngineConfiguration, shared: EngineShared, io: IO) throws(SystemError) {
        self.handle = handle
        self.configuration = configuration
        self.shared = shared
        self.io = io
        loop = try EventLoopCore(capacity: configuration.eventsPerWait, wakeup: handle.wakeup)
        pipes = PipePool(idleLimit: configuration.idlePipes, inUseLimit: configuration.maxPipes,
                         pipeSize: configuration.pipeSize)
        scratch = UnsafeMutableRawPointer.allocate(byteCount: configuration.copyBufferSize, alignment: 64)
    }

    deinit {
        for session in sessions.live { closeSession(session) }
        for frontend in frontends { closeListener(frontend) }
        scratch.deallocate()
    }

    @inline(__always) func assertOnLoop() {
        assert(pthread_equal(thread, pthread_self()) != 0, "called off the worker's thread")
    }

    // MARK: The loop

    /// Runs until a `stop` command has been served and every session has ended.
    func run() {
        if !configuration.cpus.isEmpty {
            pinCurrentThread(toCPU: configuration.cpus[handle.index % configuration.cpus.count])
        }
        while !(stopping && activeSessions == 0) {
            let ready: Int
            do {
                ready = try loop.wait(until: min(acceptResumeAt, stopDeadline), busy: !deferredSessions.isEmpty)
            } catch {
                // EINTR is retried inside; what is left (ENOMEM, ...) is counted and outlived.
                handle.registry.loopErrors.add(1, ordering: .relaxed)
                usleep(10_000)
                continue
            }
            now = MonotonicClock.milliseconds()
            for index in 0..<ready {
                let (events, token) = loop.epoll.event(at: index)
                dispatch(events: events, token: token)
            }
            afterEvents()
        }
    }

    /// What a loop round does after its events: deferred sessions, timers, resuming, the stop.
    func afterEvents() {
        if !deferredSessions.isEmpty { runDeferred() }
        fireTimers()
        if acceptPaused && now >= acceptResumeAt { resumeAccepting() }
        if stopping && now >= stopDeadline {
            for session in sessions.live {
                session.termination = Termination.killed
                closeSession(session)
            }
        }
    }

    @inline(__always)
    func dispatch(events: UInt32, token: UInt64) {
        let kind = EventToken.kind(token)
        switch kind {
        case WorkerToken.client, WorkerToken.backend:
            // Stale (nil): the slot was freed, or its session changed backend, after this event
            // was queued.
            guard let session = sessions.lookup(token: token) else { return }
            sessionEvent(session, backendSide: kind == WorkerToken.backend, events: events)
        case WorkerToken.listener:
            let slot = EventToken.slot(token)
            guard slot < listenerSlots.count, let listener = listenerSlots[slot] else { return }
            acceptConnections(listener.frontend, listener: listener.fd)
        default:
            handle.wakeup.drain()
            processMailbox()
        }
    }

    // MARK: Accepting

    func acceptConnections(_ frontend: FrontendRuntime, listener: CInt) {
        for _ in 0..<configuration.acceptBurst {
            // A session of this burst may have paused accepting (out of descriptors for its
            // backend socket): the rest wait in the backlog, not accepted only to be dropped.
            if acceptPaused { return }
            // The connection is counted before it is accepted, so that all workers together
            // never pass maxconn (a load then an add let each of them overshoot by one).
            if shared.connections.add(1, ordering: .relaxed).newValue > configuration.maxConnections {
                shared.connections.subtract(1, ordering: .relaxed)
                pauseAccepting()
                return
            }
            let fd: CInt
            var peer: SocketAddress?
            do {
                switch try io.accept(listener, peer: &peer) {
                case .wouldBlock:
                    shared.connections.subtract(1, ordering: .relaxed)
                    return
                case .done(let accepted): fd = accepted
                }
            } catch {
                shared.connections.subtract(1, ordering: .relaxed)
                switch error.errno {
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    pauseAccepting()
                    return
                default:
                    continue  // ECONNABORTED, EPROTO, EPERM: that one connection is gone
                }
            }
            startSession(client: fd, peer: peer, frontend: frontend)
        }
    }

    /// Stops polling every listener of this worker (no busy loop on EMFILE or maxconn); resumes
    /// when a connection of this worker closes, or after `acceptRetryDelay`.
    func pauseAccepting() {
        guard !acceptPaused else { return }
        acceptPaused = true
        acceptResumeAt = Deadline.after(configuration.acceptRetryDelay, from: now)
        handle.registry.acceptPauses.add(1, ordering: .relaxed)
        for frontend in frontends where frontend.listenerRegistered {
            deregisterListener(frontend)
        }
    }

    func resumeAccepting() {
        acceptPaused = false
        acceptResumeAt = .max
        for frontend in frontends where frontend.listener.isOpen && !frontend.listenerRegistered {
            registerListener(frontend)
        }
    }

    // MARK: Sessions

    func startSession(client fd: CInt, peer: SocketAddress?, frontend: FrontendRuntime) {
        let session = sessions.take { Session(slot: $0) }
        session.client.adopt(fd)
        session.peer = peer
        session.frontend = frontend
        session.rotation = frontend.cursor.next()
        session.clientSide.lastActivity = now
        session.replayArmed = frontend.settings.keepsReplay
        if frontend.settings.logConnections, shared.connectionLog != nil {
            session.logs = true
            session.startedAt = now
            session.acceptedWall = ConnectionLog.wallMilliseconds()
        }
        if frontend.settings.panic { frontend.counters.add(frontend.counters.panicSessions, 1) }
        if stopping || frontend.removed { session.drainDeadline = stopDeadline }
        activeSessions += 1
        handle.registry.sessions.store(activeSessions, ordering: .relaxed)
        frontend.counters.sessionStarted(at: now)
        connectNext(session)
    }

    /// Ends a session: closes both sockets, gives its pipes back, frees the slot.
    ///
    /// Session sockets are closed without EPOLL_CTL_DEL first (as HAProxy does for fds that only
    /// one poller knows): they are never duplicated, so the close removes them from the epoll
    /// set, and an event already queued for them carries the slot's old generation and is
    /// dropped in `dispatch`. That saves two system calls per connection (bench: new connections
    /// per second). Listeners, eventfds and the checker's sockets are still deregistered first.
    func closeSession(_ session: Session) {
        assertOnLoop()
        if session.logs { logClosed(session) }
        session.client.close()
        session.backend.close()
        releaseFlow(&session.request)
        releaseFlow(&session.response)
        session.dropReplay()
        if session.state == .relaying { session.server?.counters.sessionEnded() }
        session.frontend?.counters.sessionEnded()
        session.load?.remove()
        session.load = nil
        session.reset()
        sessions.release(session)
        activeSessions -= 1
        handle.registry.sessions.store(activeSessions, ordering: .relaxed)
        shared.connections.subtract(1, ordering: .relaxed)
        if acceptPaused { resumeAccepting() }
    }

    /// Hands the closing session's record to this worker's ring (the writer thread formats it).
    func logClosed(_ session: Session) {
        guard let ring = shared.connectionLog?.rings[handle.index], let frontend = session.frontend else { return }
        var record = ConnectionRecord()
        record.client = session.peer
        record.acceptedAt = session.acceptedWall
        record.frontend = frontend.name
        record.backend = session.server?.backend.name
        record.connectTime = session.connectedAt < 0 ? -1 : session.connectedAt - session.startedAt
        record.totalTime = now - session.startedAt
        record.bytesToClient = session.bytesToClient
        record.bytesFromClient = session.bytesFromClient
        var termination = session.termination
        if session.state == .connecting && termination == Termination.normal {
            termination = session.lastConnectTimedOut ? Termination.connectTimedOut : Termination.connectFailed
        }
        record.termination = termination
        // `attempt` counts the connects that failed; a session that never connected made one more.
        record.retries = session.state == .connecting ? max(0, session.attempt - 1) : session.attempt
        record.activeConnections = shared.connections.load(ordering: .relaxed)
        ring.push(record)
    }

    func releaseFlow(_ flow: inout Flow) {
        if let pipe = flow.pipe {
            if flow.pipeBytes > 0 { pipes.discard(pipe) } else { pipes.release(pipe) }
            flow.pipe = nil
            flow.pipeBytes = 0
        }
        if let held = flow.held {
            held.deallocate()
            flow.held = nil
        }
        handle.registry.pipesInUse.store(pipes.inUse, ordering: .relaxed)
    }

    // MARK: Timers

    /// Makes sure the heap will look at `session` no later than `deadline`.
    func arm(_ session: Session, at deadline: Int64) {
        guard deadline != .max else { return }
        if session.armedDeadline == 0 || deadline < session.armedDeadline {
            session.armedDeadline = deadline
            loop.timers.insert(.init(deadline: deadline, slot: session.slot, generation: session.generation))
        }
    }

    func fireTimers() {
        while let entry = loop.timers.popDue(now: now) {
            guard let session = sessions.lookup(entry), session.armedDeadline == entry.deadline else { continue }
            session.armedDeadline = 0
            let deadline = session.nextDeadline()
            if deadline <= now {
                timedOut(session)
            } else {
                arm(session, at: deadline)
            }
        }
    }

    private func timedOut(_ session: Session) {
        if session.state == .connecting && session.connectDeadline <= now && session.drainDeadline > now {
            connectFailed(session, error: ETIMEDOUT)
            return
        }
        if session.state == .relaying && session.firstByteDeadline <= now && session.drainDeadline > now {
            firstByteTimedOut(session)
            return
        }
        if let frontend = session.frontend { frontend.counters.add(frontend.counters.timeouts, 1) }
        session.termination = session.drainDeadline <= now ? Termination.killed : Termination.clientTimedOut
        // The backend's silence (--server-timeout) is counted on that backend too.
        if session.state == .relaying, let server = session.server, let settings = session.frontend?.settings,
           Deadline.idle(settings.serverTimeout, since: session.backendSide.lastActivity) <= now {
            server.counters.add(server.counters.timeouts, 1)
            if session.drainDeadline > now { session.termination = Termination.serverTimedOut }
        }
        closeSession(session)
    }

    /// Pumps the sessions deferred last round. The two lists swap, so that neither is
    /// reallocated while sessions defer themselves again during the round.
    private func runDeferred() {
        swap(&deferredSessions, &deferredRound)
        for session in deferredRound {
            session.deferred = false
            if session.state == .relaying { pump(session) }
        }
        deferredRound.removeAll(keepingCapacity: true)
    }

    func defer_(_ session: Session) {
        guard !session.deferred else { return }
        session.deferred = true
        deferredSessions.append(session)
    }
}
