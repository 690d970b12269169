import Glibc

/// The connection path of a worker: connect with retries, then relay bytes both ways.
extension Worker {
    private static let socketEvents = Epoll.readable | Epoll.writable | Epoll.readHangup | Epoll.edgeTriggered

    // MARK: Connecting

    /// Tries the next backend of the rotation; after `retries` further attempts (or with no
    /// backend at all) the client is closed at once. The client is not read before a backend is
    /// connected, so a retry loses nothing.
    func connectNext(_ session: Session) {
        guard let frontend = session.frontend else { return }
        while true {
            let backends = frontend.candidates
            guard !backends.isEmpty, session.attempt <= frontend.settings.retries, !frontend.removed else {
                frontend.counters.add(frontend.counters.failedSessions, 1)
                closeSession(session)
                return
            }
            var index = RoundRobin.index(position: session.rotation, attempt: session.attempt, count: backends.count)
            if let silent = session.silentHost, backends[index].backend.address.withPort(0) == silent {
                index = Self.nextOnAnotherHost(backends, after: index, avoiding: silent) ?? index
            }
            let server = backends[index]
            session.server = server
            do throws(SystemError) {
                var connected = false
                var socket = try Sockets.connect(to: server.backend.address, connected: &connected)
                session.backend.adopt(socket.release())
                try epoll.add(session.backend.raw, events: Self.socketEvents,
                              token: EventToken.make(kind: EventToken.backend, index: session.slot, generation: session.generation))
                if connected {
                    connected_(session, events: 0)
                } else {
                    session.state = .connecting
                    session.connectDeadline = Deadline.after(frontend.settings.connectTimeout, from: now)
                    arm(session, at: session.nextDeadline())
                }
                return
            } catch {
                session.backend.close()
                if Self.isLocalResourceShortage(error.errno) {
                    // Out of fds, buffers or ports here: not the backend's fault, and the next
                    // backend would fail the same way. Close the client and stop accepting a while.
                    frontend.counters.add(frontend.counters.failedSessions, 1)
                    closeSession(session)
                    pauseAccepting()
                    return
                }
                // Refused, unreachable: count it on this backend and try the next.
                observeFailure(frontend: frontend, server: server)
                server.counters.add(server.counters.connectErrors, 1)
                session.attempt += 1
                if session.attempt <= frontend.settings.retries { server.counters.add(server.counters.retries, 1) }
            }
        }
    }

    /// The first backend after `index` in rotation order whose host is not `host`.
    static func nextOnAnotherHost(_ backends: [BackendRuntime], after index: Int, avoiding host: SocketAddress) -> Int? {
        for step in 1..<max(1, backends.count) {
            let candidate = (index + step) % backends.count
            if backends[candidate].backend.address.withPort(0) != host { return candidate }
        }
        return nil
    }

    /// Passive health: report a backend after `observeErrors` failed connects in a row.
    private func observeFailure(frontend: FrontendRuntime, server: BackendRuntime) {
        server.consecutiveFailures += 1
        if configuration.observeErrors > 0 && server.consecutiveFailures == configuration.observeErrors {
            configuration.backendFailed?(frontend.name, server.backend.name)
        }
    }

    static func isLocalResourceShortage(_ code: CInt) -> Bool {
        code == EMFILE || code == ENFILE || code == ENOBUFS || code == ENOMEM || code == EADDRNOTAVAIL
    }

    func connectFailed(_ session: Session, error: CInt) {
        session.backend.close()  // no EPOLL_CTL_DEL needed: see `closeSession`
        session.connectDeadline = .max
        if error == ETIMEDOUT, let server = session.server { session.silentHost = server.backend.address.withPort(0) }
        if let server = session.server, let frontend = session.frontend {
            observeFailure(frontend: frontend, server: server)
            server.counters.add(server.counters.connectErrors, 1)
        }
        session.attempt += 1
        if let server = session.server, let frontend = session.frontend, session.attempt <= frontend.settings.retries {
            server.counters.add(server.counters.retries, 1)
        }
        connectNext(session)
    }

    /// connecting → relaying: register the client (it is read from now on) and start moving bytes.
    private func connected_(_ session: Session, events: UInt32) {
        session.state = .relaying
        session.connectDeadline = .max
        // The client socket inherited TCP_NODELAY from its listener.
        Sockets.setNoDelay(session.backend.raw)
        session.backendSide.writable = true
        session.backendSide.readable = events & Epoll.readable != 0
        session.backendSide.peerClosed = events & (Epoll.readHangup | Epoll.hangup) != 0
        session.backendSide.lastActivity = now
        session.clientSide.lastActivity = now
        session.server?.counters.sessionStarted(at: now)
        session.server?.consecutiveFailures = 0
        let mode = configuration.relay
        // While the session may still be replayed elsewhere, the client's bytes go through user
        // space (the copy path) so that they can be kept.
        session.request.splicing = mode == .splice && !session.replayArmed
        session.response.splicing = mode == .splice
        if session.replayCount > 0, let replay = session.replay {
            let held = UnsafeMutableRawPointer.allocate(byteCount: session.replayCount, alignment: 16)
            held.copyMemory(from: replay, byteCount: session.replayCount)
            session.request.held = held
            session.request.heldStart = 0
            session.request.heldEnd = session.replayCount
            startFirstByteTimer(session)
        }
        if !session.clientRegistered {
            do {
                try epoll.add(session.client.raw, events: Self.socketEvents,
                              token: EventToken.make(kind: EventToken.client, index: session.slot, generation: session.generation))
                session.clientRegistered = true
            } catch {
                closeSession(session)
                return
            }
        }
        arm(session, at: session.nextDeadline())
        if session.backendSide.readable || session.request.holdsBytes || session.clientSide.readable
            || session.request.sourceClosed {
            pump(session)
        }
    }

    /// relaying → connecting again: the backend closed or reset before its first byte and the
    /// client's bytes are all kept, so the session moves to the next backend and replays them.
    private func redispatch(_ session: Session) {
        session.backend.close()  // see `closeSession`
        // A new generation: an event of the old backend socket still queued in this epoll batch
        // (its fd number may be the new socket's) must not reach the new connect.
        guard renewGeneration(session) else { return }
        let clientFinished = session.request.sourceClosed
        releaseFlow(&session.request)
        releaseFlow(&session.response)
        session.request = Flow()
        session.request.sourceClosed = clientFinished
        session.response = Flow()
        session.backendSide = Side()
        session.firstByteDeadline = .max
        if let server = session.server {
            server.counters.sessionEnded()
            server.counters.add(server.counters.redispatches, 1)
        }
        if let frontend = session.frontend { frontend.counters.add(frontend.counters.redispatches, 1) }
        session.state = .connecting
        session.attempt += 1
        connectNext(session)
    }

    /// Gives the session a new generation (its old tokens and timer entries become stale) and
    /// re-registers the client under it; false when that failed and the session was closed.
    private func renewGeneration(_ session: Session) -> Bool {
        session.generation &+= 1
        session.armedDeadline = 0
        guard session.clientRegistered else { return true }
        do {
            try epoll.modify(session.client.raw, events: Self.socketEvents,
                             token: EventToken.make(kind: EventToken.client, index: session.slot, generation: session.generation))
            return true
        } catch {
            closeSession(session)
            return false
        }
    }

    /// `retryOnResponseTimeout`: the backend has sent nothing since the client's first byte.
    /// It counts as a timeout of that backend and the session moves on with its bytes replayed.
    /// It is not a failure for passive health (`observeErrors`, HAProxy's `observe layer4`):
    /// slow is not dead, and a loaded backend ejected for its slowness leaves its load to the
    /// others. A backend that accepts and never answers is for an active http check to find.
    func firstByteTimedOut(_ session: Session) {
        if let server = session.server {
            server.counters.add(server.counters.timeouts, 1)
        }
        redispatch(session)
    }

    /// Arms the first-byte timer when the client's first bytes are about to reach the backend.
    private func startFirstByteTimer(_ session: Session) {
        guard let settings = session.frontend?.settings, settings.retryOnResponseTimeout,
              session.replayArmed, !session.responseStarted else { return }
        session.firstByteDeadline = Deadline.after(settings.firstByteTimeout, from: now)
        arm(session, at: session.firstByteDeadline)
    }

    /// Whether a backend that closed before its first byte gets the session moved elsewhere:
    /// only with `retryOnEmptyResponse`, and only when the close was the backend's own doing.
    /// Once the client's FIN was passed on, the backend's close answers it: the client left
    /// (or said all it had to say), and retrying would only repeat that.
    @inline(__always)
    private func redispatchesOnClose(_ session: Session) -> Bool {
        session.replayArmed && !session.responseStarted && !session.request.finished
            && session.frontend?.settings.retryOnEmptyResponse == true
    }

    // MARK: Events

    @inline(__always)
    func sessionEvent(_ session: Session, backendSide: Bool, events: UInt32) {
        if backendSide && session.state == .connecting {
            // Writable with no error or hang-up: connected (a failed connect always reports
            // EPOLLERR). Only then is SO_ERROR worth a system call.
            let error = events & (Epoll.error | Epoll.hangup) == 0 && events & Epoll.writable != 0
                ? 0 : Sockets.pendingError(session.backend.raw)
            if error == 0 {
                connected_(session, events: events)
            } else {
                connectFailed(session, error: error)
            }
            return
        }
        let readableMask = Epoll.readable | Epoll.error | Epoll.hangup | Epoll.readHangup
        let writableMask = Epoll.writable | Epoll.error | Epoll.hangup
        let closedMask = Epoll.readHangup | Epoll.hangup
        if backendSide {
            if events & readableMask != 0 { session.backendSide.readable = true }
            if events & writableMask != 0 { session.backendSide.writable = true }
            if events & closedMask != 0 { session.backendSide.peerClosed = true }
        } else {
            if events & readableMask != 0 { session.clientSide.readable = true }
            if events & writableMask != 0 { session.clientSide.writable = true }
            if events & closedMask != 0 { session.clientSide.peerClosed = true }
        }
        // A client event while a redispatched session connects again: remembered, acted on
        // once the new backend is connected (`connected_` pumps).
        guard session.state == .relaying else { return }
        pump(session)
    }

    /// Moves what can be moved in both directions; ends the session when both are finished or
    /// either socket failed.
    func pump(_ session: Session) {
        let client = session.client.raw
        let backend = session.backend.raw
        let up = relay(&session.request, source: &session.clientSide, sourceFD: client,
                       destination: &session.backendSide, destinationFD: backend, isRequest: true,
                       session: session)
        let down = up == .sourceFailed ? .waiting : relay(
            &session.response, source: &session.backendSide, sourceFD: backend,
            destination: &session.clientSide, destinationFD: client, isRequest: false, session: session)
        if session.replayArmed && !session.responseStarted {
            // A reset is the backend failing, unless the client had closed without a byte.
            let reset = (up == .destinationFailed || down == .sourceFailed)
                && session.frontend?.settings.retryOnEmptyResponse == true
                && !(session.request.finished && session.replayCount == 0)
            if reset || (session.response.sourceClosed && redispatchesOnClose(session)) {
                redispatch(session)
                return
            }
        }
        if up == .sourceFailed || up == .destinationFailed || down == .sourceFailed || down == .destinationFailed
            || (session.request.finished && session.response.finished) {
            closeSession(session)
            return
        }
        if up == .budgetSpent || down == .budgetSpent { defer_(session) }
    }

    enum RelayOutcome {
        /// Nothing more to do until the next readiness event.
        case waiting
        /// The bound on chunks per wake-up was reached with more to move.
        case budgetSpent
        /// Reading the source failed (reset): the session must end (or be redispatched).
        case sourceFailed
        /// Writing the destination failed (reset, broken pipe).
        case destinationFailed
    }

    /// One direction: flush what is held, pass on a FIN, read and forward new bytes, until a
    /// call would block or the per-wake-up budget is spent.
    ///
    /// Splice path invariant: bytes are only spliced into an *empty* pipe, so an EAGAIN from
    /// socket → pipe always means "socket empty", never "pipe full" (HAProxy's ambiguity).
    @inline(__always)
    private func relay(
        _ flow: inout Flow, source: inout Side, sourceFD: CInt,
        destination: inout Side, destinationFD: CInt, isRequest: Bool, session: Session
    ) -> RelayOutcome {
        var budget = configuration.chunksPerWakeup
        // Which socket the call in progress touches, to say which side failed.
        var sourceCall = false
        do {
            while true {
                // 1. Flush held bytes; while any remain the source is not read (back-pressure).
                if flow.pipeBytes > 0 {
                    guard destination.writable else { return .waiting }
                    switch try Sockets.splice(from: flow.pipe!.output, to: destinationFD, count: flow.pipeBytes) {
                    case .done(let moved):
                        flow.pipeBytes -= moved
                        destination.lastActivity = now
                        if flow.pipeBytes > 0 { continue }
                    case .wouldBlock:
                        destination.writable = false
                        return .waiting
                    }
                    pipes.release(flow.pipe!)
                    flow.pipe = nil
                }
                if let held = flow.held {
                    guard destination.writable else { return .waiting }
                    switch try Sockets.write(destinationFD, from: held + flow.heldStart, count: flow.heldEnd - flow.heldStart) {
                    case .done(let written):
                        flow.heldStart += written
                        destination.lastActivity = now
                        if flow.heldStart < flow.heldEnd { continue }
                    case .wouldBlock:
                        destination.writable = false
                        return .waiting
                    }
                    held.deallocate()
                    flow.held = nil
                }
                // 2. Source finished and everything passed on: pass the FIN on, once. A backend
                // that closes before answering, while the session may still be replayed, is not
                // passed on: `pump` moves the session to another backend.
                if flow.sourceClosed {
                    if !isRequest && redispatchesOnClose(session) { return .waiting }
                    if !flow.finished {
                        // When the other direction is finished too, the session closes right
                        // away and close() sends this FIN: no shutdown call needed.
                        let otherFinished = isRequest ? session.response.finished : session.request.finished
                        if !otherFinished { Sockets.shutdownWrite(destinationFD) }
                        flow.finished = true
                    }
                    return .waiting
                }
                guard source.readable else { return .waiting }
                if budget == 0 { return .budgetSpent }
                budget -= 1
                // 3. Move a new chunk.
                if flow.splicing, let pipe = flow.pipe ?? pipes.acquire() {
                    flow.pipe = pipe
                    sourceCall = true
                    let spliced = try Sockets.splice(from: sourceFD, to: pipe.input, count: pipes.capacity)
                    sourceCall = false
                    switch spliced {
                    case .done(0):
                        flow.sourceClosed = true
                    case .done(let moved):
                        flow.pipeBytes = moved
                        source.lastActivity = now
                        count(moved, isRequest: isRequest, session: session)
                        if !isRequest && !session.responseStarted { responseStarted(session) }
                    case .wouldBlock:
                        source.readable = false
                    }
                    if flow.pipeBytes == 0 {
                        pipes.release(pipe)
                        flow.pipe = nil
                    }
                    handle.registry.pipesInUse.store(pipes.inUse, ordering: .relaxed)
                    continue
                }
                let capacity = configuration.copyBufferSize
                sourceCall = true
                let readResult = try Sockets.read(sourceFD, into: scratch, count: capacity)
                sourceCall = false
                switch readResult {
                case .done(0):
                    flow.sourceClosed = true
                    continue
                case .done(let received):
                    source.lastActivity = now
                    count(received, isRequest: isRequest, session: session)
                    if session.replayArmed {
                        if isRequest { keepForReplay(session, received) } else { responseStarted(session) }
                    } else if !isRequest && !session.responseStarted {
                        session.responseStarted = true
                    }
                    // A short read drained the socket, unless its FIN is pending (read on to get 0).
                    if received < capacity && !source.peerClosed { source.readable = false }
                    // (Not while the client's bytes may still be replayed: they must stay in view.)
                    if configuration.relay == .auto && received >= configuration.spliceThreshold
                        && !(isRequest && session.replayArmed) {
                        flow.splicing = true
                    }
                    var written = 0
                    if destination.writable {
                        while written < received {
                            switch try Sockets.write(destinationFD, from: scratch + written, count: received - written) {
                            case .done(let count):
                                written += count
                                destination.lastActivity = now
                                continue
                            case .wouldBlock:
                                destination.writable = false
                            }
                            break
                        }
                    }
                    if written < received {
                        let rest = received - written
                        let held = UnsafeMutableRawPointer.allocate(byteCount: rest, alignment: 16)
                        held.copyMemory(from: scratch + written, byteCount: rest)
                        flow.held = held
                        flow.heldStart = 0
                        flow.heldEnd = rest
                        return .waiting
                    }
                case .wouldBlock:
                    source.readable = false
                    return .waiting
                }
            }
        } catch {
            return sourceCall ? .sourceFailed : .destinationFailed
        }
    }

    /// The backend answered: the session stays with it; the request direction may splice now.
    private func responseStarted(_ session: Session) {
        session.responseStarted = true
        session.dropReplay()
        if configuration.relay == .splice { session.request.splicing = true }
    }

    /// Appends the client's latest bytes (in `scratch`) to the replay buffer, or gives up
    /// replaying when they no longer fit.
    private func keepForReplay(_ session: Session, _ count: Int) {
        guard let limit = session.frontend?.settings.replayLimit, session.replayCount + count <= limit else {
            session.dropReplay()
            return
        }
        if session.replay == nil {
            session.replay = UnsafeMutableRawPointer.allocate(byteCount: limit, alignment: 16)
        }
        (session.replay! + session.replayCount).copyMemory(from: scratch, byteCount: count)
        if session.replayCount == 0 { startFirstByteTimer(session) }
        session.replayCount += count
    }

    @inline(__always)
    private func count(_ bytes: Int, isRequest: Bool, session: Session) {
        let amount = UInt64(bytes)
        if let server = session.server?.counters {
            server.countBytes(amount, fromClient: isRequest)
        }
        if let frontend = session.frontend?.counters {
            frontend.countBytes(amount, fromClient: isRequest)
        }
    }
}
