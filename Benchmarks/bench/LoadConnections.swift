import BerthSystem
import CBerthShims
import Glibc
import Histogram

/// The load generator's sockets: opening, reopening and closing its connection slots.
extension LoadGenerator {
    func openPending() {
        guard !reopen.isEmpty && !stopping else { return }
        let batch = reopen
        reopen.removeAll(keepingCapacity: true)
        for slot in batch { open(connections[slot]) }
    }

    func open(_ connection: LoadConnection) {
        let target = targets[nextTarget % targets.count]
        nextTarget &+= 1
        connection.generation &+= 1
        var connected = false
        do {
            connection.socket = try Sockets.connect(to: target, connected: &connected)
        } catch {
            countError("\(error)")
            reopen.append(connection.index)
            return
        }
        Sockets.setNoDelay(connection.socket.raw)
        connection.watchesWritable = !connected
        connection.state = .connecting
        do {
            try epoll.add(connection.socket.raw, events: connected ? Epoll.readable : Epoll.writable, token: connection.token)
        } catch {
            fail(connection, "\(error)")
            return
        }
        if connected { established(connection) }
    }

    func established(_ connection: LoadConnection) {
        switch workload {
        case .bulk:
            connection.state = .streaming
            watch(connection, writable: false)
        case .latency:
            connection.state = .idle
            watch(connection, writable: false)
            idle.append(connection.index)
        case .keepAlive(_, let record):
            startRequest(connection, at: record ? MonotonicClock.nanoseconds() : 0, recorded: false)
        case .newConnections:
            startRequest(connection, at: 0, recorded: false)
        }
    }

    /// Registers the connection for writability or readability (level-triggered), if it changes.
    func watch(_ connection: LoadConnection, writable: Bool) {
        guard connection.watchesWritable != writable else { return }
        connection.watchesWritable = writable
        do {
            try epoll.modify(connection.socket.raw, events: writable ? Epoll.writable : Epoll.readable, token: connection.token)
        } catch {
            fail(connection, "\(error)")
        }
    }

    /// Deregisters and closes the socket; the slot becomes free.
    func close(_ connection: LoadConnection) {
        if connection.state == .idle, let position = idle.firstIndex(of: connection.index) {
            idle.remove(at: position)
        }
        epoll.remove(connection.socket.raw)
        connection.socket.close()
        connection.state = .free
        connection.watchesWritable = false
        connection.scanner = ResponseScanner()
    }

    func fail(_ connection: LoadConnection, _ reason: String) {
        countError(reason)
        if connection.recorded && (connection.state == .sending || connection.state == .receiving) {
            connection.recorded = false
            outstanding -= 1
        }
        close(connection)
        if !stopping { reopen.append(connection.index) }
    }

    func countError(_ reason: String) {
        errors += 1
        lastError = reason
    }
}
