import BerthSystem
import Glibc
import Synchronization

/// The demo backend, like the seed's jwilder/whoami: an HTTP/1.1 server (keep-alive, pipelining)
/// that answers every request with `I'm NAME`. `GET /bytes/N` answers N bytes instead (for bulk
/// tests). Each of its threads runs its own epoll loop with its own SO_REUSEPORT listener.
///
/// With `acceptProxy`, every connection must start with a PROXY protocol header (v1 or v2, as
/// a proxy's `send-proxy` writes it); answers then say the client it names (`From: ADDRESS`).
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
    public init(listen: SocketAddress, identity: String, threads count: Int = 1, acceptProxy: Bool = false) throws(SystemError) {
        ignoreBrokenPipeSignal()
        self.identity = identity
        var loops: [WhoamiLoop] = []
        var bound = listen
        let body = Self.responseBody(identity: identity)
        for _ in 0..<max(1, count) {
            // A loop owns its listener from here on: one that fails to start closes it, and the
            // loops already made close theirs when they are dropped with the error.
            var socket = try Sockets.listen(on: bound, reusePort: true)
            do throws(SystemError) {
                if loops.isEmpty { bound = try Sockets.localAddress(socket.raw) }
            } catch {
                socket.close()
                throw error
            }
            loops.append(try WhoamiLoop(listener: socket.release(), body: body, acceptProxy: acceptProxy))
        }
        address = bound
        stopSignals = loops.map { $0.wakeup }
        threads = Mutex([])
        var started: [pthread_t] = []
        for (index, loop) in loops.enumerated() {
            loop.counter = self
            let thread = OSThread(name: "whoami-\(index)") { loop.run() }
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

/// One whoami event loop (one thread), on BerthSystem's `ServerLoop`: its wake-up is the stop
/// signal. Made on the starting thread, then handed to its own thread and touched only there.
private final class WhoamiLoop: @unchecked Sendable {
    final class Connection: StreamConnection {
        /// Body bytes of the current request still to skip.
        var skipping = 0
        /// The PROXY header has not been read yet (`acceptProxy`).
        var headerPending = false
        /// The client the PROXY header named (nil for LOCAL/UNKNOWN, or without `acceptProxy`).
        var proxiedClient: SocketAddress?

        override func open(_ fd: CInt) {
            super.open(fd)
            skipping = 0
            proxiedClient = nil
        }
    }

    let body: [UInt8]
    let acceptProxy: Bool
    var counter: WhoamiServer?
    var server: ServerLoop<Connection>
    let scratch: UnsafeMutableRawBufferPointer

    /// Takes `listener` (closed here if the loop cannot be made).
    init(listener fd: CInt, body: [UInt8], acceptProxy: Bool) throws(SystemError) {
        server = try ServerLoop(listener: fd, capacity: 128)
        self.body = body
        self.acceptProxy = acceptProxy
        // Last: an init that throws runs no deinit, so nothing above may own memory.
        scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
    }

    deinit {
        scratch.deallocate()
    }

    var wakeup: WakeupSignal { server.core.wakeup }

    func run() {
        serving: while true {
            let count = (try? server.core.wait()) ?? 0
            for index in 0..<count {
                let (events, token) = server.core.epoll.event(at: index)
                if token == EventToken.wakeup { break serving }
                if token == ServerLoop<Connection>.listenerToken {
                    server.acceptAll(opened: { [acceptProxy] connection in connection.headerPending = acceptProxy })
                    continue
                }
                guard let connection = server.connections.lookup(token: token) else { continue }
                if events & (Epoll.readable | Epoll.hangup | Epoll.error) != 0 {
                    readAndAnswer(connection)
                } else if events & Epoll.writable != 0 {
                    flush(connection)
                }
            }
        }
        server.closeAll()
    }

    private func close(_ connection: Connection) {
        server.close(connection)
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
        if connection.headerPending {
            switch connection.input.withUnsafeBytes({ ProxyHeaderParser.parse($0) }) {
            case .incomplete:
                return
            case .invalid(let reason):
                respond(connection, status: "400 Bad Request", body: Array("\(reason)\n".utf8), close: true)
                connection.input.removeAll()
                flush(connection)
                return
            case .complete(let source, _, let length):
                connection.headerPending = false
                connection.proxiedClient = source
                connection.input.removeFirst(length)
            }
        }
        answerComplete(connection)
        flush(connection)
    }

    private func answerComplete(_ connection: Connection) {
        var consumed = 0
        var answered: UInt64 = 0
        defer {
            if consumed > 0 { connection.input.removeFirst(consumed) }
            if answered > 0 { counter?.countAnswered(answered) }
        }
        while !connection.closeAfterWrite && connection.skipping == 0 && consumed < connection.input.count {
            let outcome = connection.input.withUnsafeBytes { raw in
                RequestHead.parse(UnsafeRawBufferPointer(rebasing: raw[consumed...]))
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
                } else if let client = connection.proxiedClient {
                    payload += Array("From: \(client)\n".utf8)
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
        switch connection.writeOutput() {
        case .failed:
            close(connection)
        case .blocked:
            if !server.watch(connection, writable: true) { close(connection) }
        case .done:
            if connection.closeAfterWrite {
                close(connection)
            } else if connection.wantsWrite {
                if !server.watch(connection, writable: false) { return close(connection) }
                // Requests held back while the answers drained.
                answerComplete(connection)
                if !connection.output.isEmpty { flush(connection) }
            }
        }
    }
}
