import BerthSystem
import Glibc

/// The connecting half of a worker's connection path: the rotation with retries, the connect
/// outcome, and the redispatches that send a session back to connecting.
extension Worker {
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
                session.termination = session.lastConnectTimedOut ? Termination.connectTimedOut : Termination.connectFailed
                closeSession(session)
                return
            }
            // The balancing mode picks the first backend; a retry moves on to the next ones in order.
            if session.attempt == 0 { session.firstPick = firstPick(session, frontend: frontend, backends: backends) }
            var index = RoundRobin.index(position: UInt64(session.firstPick), attempt: session.attempt, count: backends.count)
            if let silent = session.silentHost, backends[index].backend.address.withPort(0) == silent {
                index = Self.nextOnAnotherHost(backends, after: index, avoiding: silent) ?? index
            }
            let server = backends[index]
            session.server = server
            if session.load !== server.load {
                session.load?.remove()
                session.load = server.load
                session.load?.add()
            }
            do throws(SystemError) {
                var connected = false
                var socket = try io.connect(to: server.backend.address, connected: &connected)
                session.backend.adopt(socket.release())
                try loop.epoll.add(session.backend.raw, events: WorkerToken.socketEvents,
                              token: EventToken.make(kind: WorkerToken.backend, slot: session.slot, generation: session.generation))
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
                    session.termination = Termination.resource
                    closeSession(session)
                    pauseAccepting()
                    return
                }
                // Refused, unreachable: count it on this backend and try the next.
                session.lastConnectTimedOut = false
                observeFailure(frontend: frontend, server: server)
                server.counters.add(server.counters.connectErrors, 1)
                session.attempt += 1
                if session.attempt <= frontend.settings.retries { server.counters.add(server.counters.retries, 1) }
            }
        }
    }

    /// The candidate a new session tries first, by the frontend's balancing mode.
    @inline(__always)
    func firstPick(_ session: Session, frontend: FrontendRuntime, backends: [BackendRuntime]) -> Int {
        let rotation = RoundRobin.index(position: session.rotation, attempt: 0, count: backends.count)
        switch frontend.settings.balance {
        case .roundRobin:
            if let schedule = frontend.schedule {
                return Int(schedule[RoundRobin.index(position: session.rotation, attempt: 0, count: schedule.count)])
            }
            return rotation
        case .leastConn:
            // The rotation decides where the scan starts, so that equally loaded backends take turns.
            return LeastConnections.pick(count: backends.count, start: rotation,
                                         load: { backends[$0].load?.current ?? 0 },
                                         weight: { backends[$0].backend.effectiveWeight })
        case .source:
            guard let ring = frontend.ring, let peer = session.peer else { return rotation }
            return ring.owner(of: HashRing.key(of: peer)) % backends.count
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
    func observeFailure(frontend: FrontendRuntime, server: BackendRuntime) {
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
        session.lastConnectTimedOut = error == ETIMEDOUT
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
    func connected_(_ session: Session, events: UInt32) {
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
        if session.logs { session.connectedAt = now }
        let mode = configuration.relay
        // While the session may still be replayed elsewhere, the client's bytes go through user
        // space (the copy path) so that they can be kept.
        session.request.splicing = mode == .splice && !session.replayArmed
        session.response.splicing = mode == .splice
        // `sendProxy`: the PROXY header goes first, before the client's bytes, to every backend
        // the session is connected to (a replay to the next backend starts with it again).
        let header = session.frontend?.settings.sendProxy.map { proxyHeader(session, version: $0) }
        let heldCount = (header?.count ?? 0) + session.replayCount
        if heldCount > 0 {
            let held = UnsafeMutableRawPointer.allocate(byteCount: heldCount, alignment: 16)
            let headerCount = header?.count ?? 0
            if let header { header.withUnsafeBytes { held.copyMemory(from: $0.baseAddress!, byteCount: headerCount) } }
            if session.replayCount > 0, let replay = session.replay {
                (held + headerCount).copyMemory(from: replay, byteCount: session.replayCount)
            }
            session.request.held = held
            session.request.heldStart = 0
            session.request.heldEnd = heldCount
            if session.replayCount > 0 { startFirstByteTimer(session) }
        }
        if !session.clientRegistered {
            do {
                try loop.epoll.add(session.client.raw, events: WorkerToken.socketEvents,
                              token: EventToken.make(kind: WorkerToken.client, slot: session.slot, generation: session.generation))
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

    /// The PROXY header of `session`: its client (from accept) and the address it connected to
    /// (getsockname, once per session, only with `sendProxy`).
    func proxyHeader(_ session: Session, version: ProxyProtocolVersion) -> [UInt8] {
        if !session.destinationKnown {
            session.destination = try? Sockets.localAddress(session.client.raw)
            session.destinationKnown = true
        }
        return ProxyHeaderEncoder.encode(v2: version == .v2, source: session.peer, destination: session.destination)
    }

    /// relaying → connecting again: the backend closed or reset before its first byte and the
    /// client's bytes are all kept, so the session moves to the next backend and replays them.
    func redispatch(_ session: Session) {
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
    func renewGeneration(_ session: Session) -> Bool {
        session.generation &+= 1
        session.armedDeadline = 0
        guard session.clientRegistered else { return true }
        do {
            try loop.epoll.modify(session.client.raw, events: WorkerToken.socketEvents,
                             token: EventToken.make(kind: WorkerToken.client, slot: session.slot, generation: session.generation))
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
    func startFirstByteTimer(_ session: Session) {
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
    func redispatchesOnClose(_ session: Session) -> Bool {
        session.replayArmed && !session.responseStarted && !session.request.finished
            && session.frontend?.settings.retryOnEmptyResponse == true
    }
}
