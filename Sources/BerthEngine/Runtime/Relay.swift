import BerthSystem
import Glibc
import Synchronization

/// The relaying half of a worker's connection path (Connecting.swift has the other): readiness
/// events, and bytes moved both ways.
extension Worker {
    // MARK: Events

    @inline(__always)
    func sessionEvent(_ session: Session, backendSide: Bool, events: UInt32) {
        if backendSide && session.state == .connecting {
            // Writable with no error or hang-up: connected (a failed connect always reports
            // EPOLLERR). Only then is SO_ERROR worth a system call.
            let error = events & (Epoll.error | Epoll.hangup) == 0 && events & Epoll.writable != 0
                ? 0 : io.pendingError(session.backend.raw)
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
            if up == .sourceFailed || down == .destinationFailed {
                session.termination = Termination.clientAborted
            } else if up == .destinationFailed || down == .sourceFailed {
                session.termination = Termination.serverAborted
            }
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
        if session.logs {
            if isRequest { session.bytesFromClient &+= amount } else { session.bytesToClient &+= amount }
        }
        if let server = session.server?.counters {
            server.countBytes(amount, fromClient: isRequest)
        }
        if let frontend = session.frontend?.counters {
            frontend.countBytes(amount, fromClient: isRequest)
        }
    }
}
