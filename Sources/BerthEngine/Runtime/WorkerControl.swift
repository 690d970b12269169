import BerthSystem
import Glibc
import Synchronization

/// A worker's control messages: tables to install, listeners to adopt, the stop.
extension Worker {
    // MARK: Control messages

    func processMailbox() {
        let commands = handle.mailbox.withLock { mailbox in
            let taken = mailbox
            mailbox.removeAll()
            return taken
        }
        for command in commands {
            switch command {
            case .install(let published, let listeners):
                install(published, listeners: listeners)
            case .stop(let deadline):
                beginStopping(deadline: deadline)
            }
        }
    }

    /// Installs a table. A frontend given exactly as before (and no new listener for it) is
    /// kept as it is: a change costs the frontends it changed. A table with changes relative to
    /// the one installed last is installed by those alone.
    func install(_ published: PublishedTable, listeners: [String: [CInt]]) {
        assertOnLoop()
        defer { installedSerial = published.table.serial }
        var removedAny = false
        if let changes = published.table.changes, changes.base == installedSerial, installedSerial != 0 {
            for name in changes.names {
                let (index, found) = published.table.search(name)
                let (position, held) = frontends.searchByName(name) { $0.name }
                if found {
                    let runtime = installFrontend(published, at: index, current: held ? frontends[position] : nil,
                                                  listeners: listeners, removedAny: &removedAny)
                    if held { frontends[position] = runtime } else { frontends.insert(runtime, at: position) }
                } else if held {
                    removeFrontend(frontends.remove(at: position))
                    removedAny = true
                }
            }
            closeUnadopted(listeners) { name in
                changes.names.searchByName(name) { $0 }.found && published.table.search(name).found
            }
        } else {
            var next: [FrontendRuntime] = []
            next.reserveCapacity(published.table.frontends.count)
            var matcher = NameMatcher(previous: frontends.map(\.name))
            var stays = [Bool](repeating: false, count: frontends.count)
            for index in published.table.frontends.indices {
                let position = matcher.position(of: published.table.frontends[index].name)
                if let position { stays[position] = true }
                next.append(installFrontend(published, at: index, current: position.map { frontends[$0] },
                                            listeners: listeners, removedAny: &removedAny))
            }
            for (position, runtime) in frontends.enumerated() where !stays[position] {
                removeFrontend(runtime)
                removedAny = true
            }
            if !listeners.isEmpty {
                let installed = Set(next.map(\.name))
                closeUnadopted(listeners) { installed.contains($0) }
            }
            frontends = next
        }
        pruneCounters(removedAny: removedAny)
    }

    /// The frontend at `index` of `published` as this worker serves it: `current` (the same
    /// name installed before) kept as it is when unchanged, else updated in place, or new.
    private func installFrontend(_ published: PublishedTable, at index: Int, current: FrontendRuntime?,
                                 listeners: [String: [CInt]], removedAny: inout Bool) -> FrontendRuntime {
        let spec = published.table.frontends[index]
        if let kept = current, kept.spec == spec, listeners.isEmpty || listeners[spec.name] == nil {
            return kept
        }
        let runtime = current ?? FrontendRuntime(
            name: spec.name,
            cursor: published.cursors[spec.name] ?? RoundRobinCursor(),
            counters: handle.registry.counters(frontend: spec.name, backend: nil),
            settings: spec.settings)
        runtime.settings = spec.settings
        runtime.spec = spec
        var existing: [String: BackendRuntime] = [:]
        for backend in runtime.backends { existing[backend.backend.name] = backend }
        runtime.backends = spec.backends.map { backend in
            // Kept only at the same address: one that moved under the same name stays in
            // `existing` and is drained below like any removed backend.
            if let kept = existing[backend.name], kept.backend.address == backend.address {
                existing.removeValue(forKey: backend.name)
                kept.backend = backend
                return kept
            }
            return BackendRuntime(
                backend: backend,
                counters: handle.registry.counters(frontend: spec.name, backend: backend.name))
        }
        runtime.candidates = runtime.backends.filter { PublishedTable.isCandidate($0.backend) }
        runtime.schedule = published.schedules[index]
        runtime.ring = published.rings[index]
        let loads = published.loads[spec.name]
        for backend in runtime.backends { backend.load = loads?[backend.backend.name] }
        for gone in existing.values {
            gone.removed = true
            removedAny = true
            unprunedCounters.insert(.init(frontend: spec.name, backend: gone.backend.name))
        }
        if let fds = listeners[spec.name], let first = fds.first {
            closeListener(runtime)
            runtime.listener.adopt(first)
            runtime.extraListeners.append(contentsOf: Array(fds.dropFirst()))
            registerListener(runtime)
        }
        return runtime
    }

    /// Closes the sockets handed over for frontends this install did not take (one the table
    /// does not contain: raced with a newer table).
    private func closeUnadopted(_ listeners: [String: [CInt]], installed: (String) -> Bool) {
        for (name, fds) in listeners where !installed(name) { for fd in fds { closeDescriptor(fd) } }
    }

    /// A frontend that left the table: it stops accepting, and it and its backends drain.
    private func removeFrontend(_ runtime: FrontendRuntime) {
        let name = runtime.name
        runtime.removed = true
        unprunedCounters.insert(.init(frontend: name, backend: nil))
        for backend in runtime.backends {
            backend.removed = true
            unprunedCounters.insert(.init(frontend: name, backend: backend.backend.name))
        }
        closeListener(runtime)
    }

    /// Drains the sessions of removed frontends and backends, and drops counters no session
    /// holds any more.
    private func pruneCounters(removedAny: Bool) {
        guard removedAny || !unprunedCounters.isEmpty else { return }
        // Removed backends and frontends: their open connections drain, and their counters
        // (those of these sessions, connecting ones included: they count only once connected)
        // are kept while any is open; then dropped.
        let drainDeadline = Deadline.after(configuration.drainTimeout, from: now)
        var held = Set<CounterRegistry.Key>()
        for session in sessions.live {
            guard let frontend = session.frontend, frontend.removed || session.server?.removed == true else { continue }
            held.insert(.init(frontend: frontend.name, backend: nil))
            if let server = session.server { held.insert(.init(frontend: frontend.name, backend: server.backend.name)) }
            session.drainDeadline = min(session.drainDeadline, drainDeadline)
            arm(session, at: session.nextDeadline())
        }
        var drop: [CounterRegistry.Key] = []
        for key in unprunedCounters where !held.contains(key) {
            // Back in the table (or moved to a new address under the same name): its counters
            // are the table's again.
            if let frontend = frontends.first(where: { $0.name == key.frontend }),
               key.backend.map({ name in frontend.backends.contains { $0.backend.name == name } }) ?? true {
                unprunedCounters.remove(key)
                continue
            }
            drop.append(key)
            unprunedCounters.remove(key)
        }
        handle.registry.remove(drop)
    }

    /// Polls every socket of the frontend's listener group (one, or more after a takeover).
    func registerListener(_ frontend: FrontendRuntime) {
        guard frontend.listener.isOpen, !stopping, !frontend.listenerRegistered else { return }
        for fd in [frontend.listener.raw] + frontend.extraListeners.fds {
            var slot = listenerSlots.firstIndex { $0?.fd == fd } ?? listenerSlots.firstIndex { $0 == nil }
            if slot == nil {
                listenerSlots.append(nil)
                slot = listenerSlots.count - 1
            }
            listenerSlots[slot!] = ListenerSlot(frontend: frontend, fd: fd)
        }
        guard !acceptPaused else { return }
        do {
            for (slot, listener) in listenerSlots.enumerated() where listener?.frontend === frontend {
                try loop.epoll.add(listener!.fd, events: Epoll.readable,
                                   token: EventToken.make(kind: WorkerToken.listener, slot: Int32(slot), generation: 0))
                frontend.listenerRegistered = true
            }
        } catch {
            // ENOSPC (max_user_watches) or ENOMEM: counted; accepting pauses and
            // `resumeAccepting` registers the listener again after `acceptRetryDelay`.
            handle.registry.loopErrors.add(1, ordering: .relaxed)
            pauseAccepting()
            if frontend.listenerRegistered { deregisterListener(frontend) }
        }
    }

    /// Stops polling the frontend's listening sockets (they stay open).
    func deregisterListener(_ frontend: FrontendRuntime) {
        for listener in listenerSlots where listener?.frontend === frontend {
            loop.epoll.remove(listener!.fd)
        }
        frontend.listenerRegistered = false
    }

    func closeListener(_ frontend: FrontendRuntime) {
        if frontend.listenerRegistered { deregisterListener(frontend) }
        frontend.listener.close()
        frontend.extraListeners.close()
        for (slot, listener) in listenerSlots.enumerated() where listener?.frontend === frontend { listenerSlots[slot] = nil }
    }

    func beginStopping(deadline: Int64) {
        stopping = true
        stopDeadline = deadline
        for frontend in frontends { closeListener(frontend) }
    }
}
