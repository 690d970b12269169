import Glibc

/// One connection of a small request/response server loop (`ServerLoop`: whoami, the stats
/// server): its socket, what it read and has not consumed yet, and what it must still write.
/// Subclasses add their protocol's state and reset it in `open`.
open class StreamConnection: Slotted {
    public let slot: Int32
    public var generation: UInt32 = 0
    public var socket = Descriptor.none
    public var input: [UInt8] = []
    public var output: [UInt8] = []
    /// Bytes of `output` already written.
    public var written = 0
    /// The connection ends once `output` is written.
    public var closeAfterWrite = false
    /// Registered for writability (else for readability).
    public var wantsWrite = false

    public var isLive: Bool { socket.isOpen }

    public required init(slot: Int32) {
        self.slot = slot
    }

    /// Takes a fresh connection into a reused slot.
    open func open(_ fd: CInt) {
        socket.adopt(fd)
        input.removeAll(keepingCapacity: true)
        output.removeAll(keepingCapacity: true)
        written = 0
        closeAfterWrite = false
        wantsWrite = false
    }

    /// Writes `output` from `written` on, until it is all written (then emptied) or the socket's
    /// buffer is full.
    public func writeOutput() -> WriteProgress {
        let fd = socket.raw
        while written < output.count {
            let result = output.withUnsafeBytes { raw in
                try? Sockets.write(fd, from: raw.baseAddress! + written, count: raw.count - written)
            }
            switch result {
            case .done(let count)?: written += count
            case .wouldBlock?: return .blocked
            case nil: return .failed
            }
        }
        output.removeAll(keepingCapacity: true)
        written = 0
        return .done
    }
}

/// How far `StreamConnection.writeOutput` got.
public enum WriteProgress {
    /// Everything was written.
    case done
    /// The socket takes no more for now: wait for writability.
    case blocked
    /// The peer is gone (reset, broken pipe).
    case failed
}

/// A listening socket and the event loop that serves it, for one thread: accepted connections
/// live in a slot table, each registered for readability or (while its answers wait) for
/// writability, level-triggered. The protocol is the owner's; this is the plumbing whoami and the
/// stats server share.
public struct ServerLoop<Connection: StreamConnection>: ~Copyable {
    public static var listenerToken: UInt64 { EventToken.make(kind: 1, slot: 0, generation: 0) }
    static var connectionKind: UInt64 { 2 }
    /// Connections accepted per readiness of the listener.
    static var acceptBurst: Int { 64 }

    public var core: EventLoopCore
    public var connections = SlotTable<Connection>()
    private var listener: Descriptor

    /// Takes `listener` (closed here if the loop cannot be made).
    public init(listener fd: CInt, capacity: Int) throws(SystemError) {
        var listener = Descriptor(adopting: fd)
        do {
            core = try Self.makeCore(listener: fd, capacity: capacity)
        } catch {
            listener.close()
            throw error
        }
        self.listener = listener
    }

    /// The loop's core with `listener` registered (the core is dropped if that fails).
    private static func makeCore(listener fd: CInt, capacity: Int) throws(SystemError) -> EventLoopCore {
        let core = try EventLoopCore(capacity: capacity, wakeup: try WakeupSignal())
        try core.epoll.add(fd, events: Epoll.readable, token: listenerToken)
        return core
    }

    deinit {
        var listener = listener
        if listener.isOpen {
            core.epoll.remove(listener.raw)
            listener.close()
        }
    }

    public func token(_ connection: Connection) -> UInt64 {
        EventToken.make(kind: Self.connectionKind, slot: connection.slot, generation: connection.generation)
    }

    /// Accepts what is pending (at most `acceptBurst`). `admit` may refuse a connection (it is
    /// closed at once); `opened` sees each one taken.
    public mutating func acceptAll(admit: () -> Bool = { true }, opened: (Connection) -> Void = { _ in }) {
        for _ in 0..<Self.acceptBurst {
            guard case .done(let fd)? = try? Sockets.accept(listener.raw) else { return }
            guard admit() else {
                var refused = Descriptor(adopting: fd)
                refused.close()
                continue
            }
            Sockets.setNoDelay(fd)
            let connection = connections.take { Connection(slot: $0) }
            connection.open(fd)
            do {
                try core.epoll.add(fd, events: Epoll.readable, token: token(connection))
            } catch {
                connection.socket.close()
                connections.release(connection)
                continue
            }
            opened(connection)
        }
    }

    /// Registers `connection` for writability or readability, if that changes; false (the
    /// connection must be closed) when epoll refuses.
    public mutating func watch(_ connection: Connection, writable: Bool) -> Bool {
        guard connection.wantsWrite != writable else { return true }
        connection.wantsWrite = writable
        do {
            try core.epoll.modify(connection.socket.raw, events: writable ? Epoll.writable : Epoll.readable, token: token(connection))
            return true
        } catch {
            return false
        }
    }

    public mutating func close(_ connection: Connection) {
        core.epoll.remove(connection.socket.raw)
        connection.socket.close()
        connections.release(connection)
    }

    /// Closes every connection and the listener (the loop's end).
    public mutating func closeAll() {
        for connection in connections.live { close(connection) }
        core.epoll.remove(listener.raw)
        listener.close()
    }
}
