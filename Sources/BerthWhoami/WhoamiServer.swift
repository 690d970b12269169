import BerthSystem
import Glibc
import Synchronization

/// The demo backend, like the seed's jwilder/whoami: an HTTP/1.1 server (keep-alive, pipelining)
/// that answers every request with `I'm NAME`. `GET /bytes/N` answers N bytes instead (for bulk
/// tests). Each of its threads runs its own epoll loop with its own SO_REUSEPORT listener.
public final class WhoamiServer: Sendable {
    public let identity: String
    /// The address bound (port 0 resolved).
    public let address: SocketAddress
    private let stopSignals: [WakeupSignal]
    private let threads: Mutex<[pthread_t]>
    /// Requests answered, all threads.
    private let answered = Atomic<UInt64>(0)

    public var requestsAnswered: UInt64 { answered.load(ordering: .relaxed) }

    /// Binds and starts serving on `threads` threads.
    public init(listen: SocketAddress, identity: String, threads count: Int = 1) throws(SystemError) {
        ignoreBrokenPipeSignal()
        self.identity = identity
        var listeners: [CInt] = []
        var bound = listen
        var signals: [WakeupSignal] = []
        do throws(SystemError) {
            for _ in 0..<max(1, count) {
                var socket = try Sockets.listen(on: bound, reusePort: true)
                if listeners.isEmpty { bound = try Sockets.localAddress(socket.raw) }
                listeners.append(socket.release())
                signals.append(try WakeupSignal())
            }
        } catch {
            for fd in listeners {
                var socket = Descriptor(adopting: fd)
                socket.close()
            }
            throw error
        }
        address = bound
        stopSignals = signals
        threads = Mutex([])
        var started: [pthread_t] = []
        for (index, listener) in listeners.enumerated() {
            let signal = signals[index]
            let body = Self.responseBody(identity: identity)
            let thread = OSThread(name: "whoami-\(index)") { [self] in
                WhoamiLoop(listener: listener, stop: signal, body: body, counter: self).run()
            }
            started.append(thread.handle)
        }
        threads.withLock { $0 = started }
    }

    func countAnswered(_ count: UInt64) {
        answered.add(count, ordering: .relaxed)
    }

    static func responseBody(identity: String) -> [UInt8] {
        Array("I'm \(identity)\n".utf8)
    }

    /// Stops every thread (open connections are closed) and waits for them.
    public func stop() {
        let started = threads.withLock { threads in
            let taken = threads
            threads = []
            return taken
        }
        for signal in stopSignals { signal.wake() }
        for thread in started { pthread_join(thread, nil) }
    }

    /// Blocks the calling thread until `stop` is called from elsewhere.
    public func wait() {
        let started = threads.withLock { $0 }
        for thread in started { pthread_join(thread, nil) }
    }
}

/// One whoami event loop (level-triggered epoll; one thread).
private final class WhoamiLoop {
    final class Connection {
        var socket: Descriptor
        var input: [UInt8] = []
        var output: [UInt8] = []
        var written = 0
        /// Body bytes of the current request still to skip.
        var skipping = 0
        var closeAfterWrite = false
        var wantsWrite = false

        init(fd: CInt) {
            socket = Descriptor(adopting: fd)
        }
    }

    var listener: Descriptor
    let stop: WakeupSignal
    let body: [UInt8]
    let counter: WhoamiServer
    var epoll: Epoll
    var connections: [CInt: Connection] = [:]
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)

    init(listener: CInt, stop: WakeupSignal, body: [UInt8], counter: WhoamiServer) {
        self.listener = Descriptor(adopting: listener)
        self.stop = stop
        self.body = body
        self.counter = counter
        do {
            epoll = try Epoll(capacity: 128)
            try epoll.add(listener, events: Epoll.readable, token: UInt64(UInt32(bitPattern: -1)))
            try epoll.add(stop.fd, events: Epoll.readable, token: UInt64(UInt32(bitPattern: -2)))
        } catch {
            fatalError("whoami: \(error)")
        }
    }

    deinit {
        scratch.deallocate()
    }

    func run() {
        let listenToken = UInt64(UInt32(bitPattern: -1))
        let stopToken = UInt64(UInt32(bitPattern: -2))
        loop: while true {
            let count = (try? epoll.wait(timeout: -1)) ?? 0
            for index in 0..<count {
                let (events, token) = epoll.event(at: index)
                if token == stopToken { break loop }
                if token == listenToken {
                    acceptAll()
                    continue
                }
                guard let connection = connections[CInt(truncatingIfNeeded: token)] else { continue }
                if events & (Epoll.readable | Epoll.hangup | Epoll.error) != 0 {
                    readAndAnswer(connection)
                } else if events & Epoll.writable != 0 {
                    flush(connection)
                }
            }
        }
        for connection in connections.values { close(connection) }
        epoll.remove(listener.raw)
        epoll.remove(stop.fd)
        listener.close()
    }

    private func acceptAll() {
        for _ in 0..<64 {
            guard case .done(let fd)? = try? Sockets.accept(listener.raw) else { return }
            Sockets.setNoDelay(fd)
            let connection = Connection(fd: fd)
            do {
                try epoll.add(fd, events: Epoll.readable, token: UInt64(UInt32(bitPattern: fd)))
            } catch {
                connection.socket.close()
                continue
            }
            connections[fd] = connection
        }
    }

    private func close(_ connection: Connection) {
        let fd = connection.socket.raw
        epoll.remove(fd)
        connections[fd] = nil
        connection.socket.close()
    }

    private func readAndAnswer(_ connection: Connection) {
        let fd = connection.socket.raw
        let result: IOResult<Int>
        do {
            result = try Sockets.read(fd, into: scratch.baseAddress!, count: scratch.count)
        } catch {
            close(connection)
            return
        }
        guard case .done(let count) = result else { return }
        if count == 0 {
            close(connection)
            return
        }
        var bytes = UnsafeRawBufferPointer(rebasing: scratch[0..<count])
        if connection.skipping > 0 {
            let skipped = min(connection.skipping, bytes.count)
            connection.skipping -= skipped
            bytes = UnsafeRawBufferPointer(rebasing: bytes[skipped...])
        }
        connection.input.append(contentsOf: bytes)
        answerComplete(connection)
        flush(connection)
    }

    private func answerComplete(_ connection: Connection) {
        var consumed = 0
        var answered: UInt64 = 0
        defer {
            if consumed > 0 { connection.input.removeFirst(consumed) }
            if answered > 0 { counter.countAnswered(answered) }
        }
        while !connection.closeAfterWrite && connection.skipping == 0 && consumed < connection.input.count {
            let outcome = connection.input.withUnsafeBytes { raw in
                HTTPRequestHead.parse(UnsafeRawBufferPointer(rebasing: raw[consumed...]))
            }
            switch outcome {
            case .incomplete:
                return
            case .tooLarge:
                respond(connection, status: "431 Request Header Fields Too Large", body: Array("request head too large\n".utf8), close: true)
                consumed = connection.input.count
                return
            case .invalid(let reason):
                respond(connection, status: "400 Bad Request", body: Array("\(reason)\n".utf8), close: true)
                consumed = connection.input.count
                return
            case .complete(let head, let length):
                consumed += length
                answered += 1
                if head.chunked {
                    respond(connection, status: "501 Not Implemented", body: Array("chunked bodies are not supported\n".utf8), close: true)
                    consumed = connection.input.count
                    return
                }
                let available = connection.input.count - consumed
                let skipNow = min(available, head.contentLength)
                consumed += skipNow
                connection.skipping = head.contentLength - skipNow
                var payload = body
                if head.target.hasPrefix("/bytes/"), let size = Int(head.target.dropFirst(7)), size >= 0, size <= 1 << 30 {
                    payload = [UInt8](repeating: UInt8(ascii: "x"), count: size)
                }
                respond(connection, status: "200 OK", body: head.method == "HEAD" ? nil : payload,
                        contentLength: payload.count, close: !head.keepAlive)
            }
        }
    }

    private func respond(_ connection: Connection, status: String, body: [UInt8]?, contentLength: Int? = nil, close: Bool) {
        var head = "HTTP/1.1 \(status)\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: \(contentLength ?? body?.count ?? 0)\r\n"
        if close { head += "Connection: close\r\n" }
        head += "\r\n"
        connection.output.append(contentsOf: head.utf8)
        if let body { connection.output.append(contentsOf: body) }
        if close { connection.closeAfterWrite = true }
    }

    private func flush(_ connection: Connection) {
        let fd = connection.socket.raw
        while connection.written < connection.output.count {
            let result = connection.output.withUnsafeBytes { raw in
                try? Sockets.write(fd, from: raw.baseAddress! + connection.written, count: raw.count - connection.written)
            }
            switch result {
            case .done(let count)?:
                connection.written += count
            case .wouldBlock?:
                if !connection.wantsWrite {
                    connection.wantsWrite = true
                    try? epoll.modify(fd, events: Epoll.writable, token: UInt64(UInt32(bitPattern: fd)))
                }
                return
            case nil:
                close(connection)
                return
            }
        }
        connection.output.removeAll(keepingCapacity: true)
        connection.written = 0
        if connection.closeAfterWrite {
            close(connection)
            return
        }
        if connection.wantsWrite {
            connection.wantsWrite = false
            try? epoll.modify(fd, events: Epoll.readable, token: UInt64(UInt32(bitPattern: fd)))
            answerComplete(connection)
        }
    }
}
