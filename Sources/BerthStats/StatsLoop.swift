import BerthSystem
import Glibc
import Synchronization

/// The stats server's event loop (one thread, level-triggered epoll on `EventLoopCore`): HTTP/1.1
/// with keep-alive and pipelining, requests answered one after another in order.
///
/// Bounds (`StatsServerConfiguration`): at most `maxConnections` open (past it, closed at once
/// and counted); a complete request must arrive within `requestTimeout` of the connection opening
/// or of the previous response being written (slowloris, idle keep-alive); the client has
/// `writeTimeout` to take a response; a head over `maxHeaderBytes` (or 100 header lines) gets
/// 431, a body over `maxBodyBytes` 413, a chunked body or anything unparseable 400, and each of
/// those closes. While a connection's unsent answers pass `outputLimit`, it is not read.
/// Made on the starting thread, then touched only on its own.
final class StatsLoop: @unchecked Sendable {
    final class Connection: StreamConnection {
        /// The client closed its sending side.
        var inputClosed = false
        /// Monotonic ms when the connection is closed unless it makes progress.
        var deadline: Int64 = 0

        override func open(_ fd: CInt) {
            super.open(fd)
            inputClosed = false
            deadline = 0
        }
    }

    /// Unsent answers past which a pipelining client is not read until they drain.
    static let outputLimit = 1 << 20
    static let sampleInterval: Int64 = 1_000

    var server: ServerLoop<Connection>
    private let configuration: StatsServerConfiguration
    private let responder: StatsResponder
    private let counts: StatsConnectionCounts
    private var nextSample: Int64 = 0
    private let scratch: UnsafeMutableRawBufferPointer

    /// Takes `listener` (closed here if the loop cannot be made).
    init(listener fd: CInt, configuration: StatsServerConfiguration, responder: StatsResponder,
         counts: StatsConnectionCounts) throws(SystemError) {
        server = try ServerLoop(listener: fd, capacity: 64)
        self.configuration = configuration
        self.responder = responder
        self.counts = counts
        // Last: an init that throws runs no deinit, so nothing above may own memory.
        scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 16)
    }

    deinit {
        scratch.deallocate()
    }

    var wakeup: WakeupSignal { server.core.wakeup }

    /// Serves until the wake-up signal, then closes every connection and the listener.
    func run() {
        ignoreBrokenPipeSignal()
        serving: while true {
            let count = (try? server.core.wait(until: earliestDeadline())) ?? 0
            for index in 0..<count {
                let (events, token) = server.core.epoll.event(at: index)
                if token == EventToken.wakeup { break serving }
                if token == ServerLoop<Connection>.listenerToken {
                    acceptAll()
                    continue
                }
                guard let connection = server.connections.lookup(token: token) else { continue }
                if events & Epoll.error != 0 {
                    close(connection)
                } else if connection.wantsWrite {
                    if events & Epoll.writable != 0 {
                        flush(connection)
                    } else if events & Epoll.hangup != 0 {
                        close(connection)  // gone both ways: the answers cannot be delivered
                    }
                } else if events & (Epoll.readable | Epoll.hangup) != 0 {
                    readAndAnswer(connection)
                }
            }
            afterEvents()
        }
        for connection in server.connections.live { close(connection) }
        server.closeAll()
    }

    /// The next sample, or the earliest connection deadline.
    private func earliestDeadline() -> Int64 {
        var earliest = nextSample
        for connection in server.connections.live where connection.deadline < earliest { earliest = connection.deadline }
        return earliest
    }

    private func afterEvents() {
        let now = MonotonicClock.milliseconds()
        if now >= nextSample {
            responder.collector.sample()
            nextSample = now + Self.sampleInterval
        }
        for connection in server.connections.live where connection.deadline <= now { close(connection) }
    }

    /// The cap counts connections from accept to close; a connection has `requestTimeout` to
    /// send its first request.
    private func acceptAll() {
        let counts = counts
        let limit = configuration.maxConnections
        let timeout = configuration.requestTimeout
        server.acceptAll(admit: {
            if counts.open.add(1, ordering: .relaxed).newValue > limit {
                counts.open.subtract(1, ordering: .relaxed)
                counts.refused.add(1, ordering: .relaxed)
                return false
            }
            return true
        }, opened: { connection in
            connection.deadline = MonotonicClock.milliseconds() + timeout
        })
    }

    private func close(_ connection: Connection) {
        guard connection.isLive else { return }
        server.close(connection)
        counts.open.subtract(1, ordering: .relaxed)
    }

    private func readAndAnswer(_ connection: Connection) {
        guard !connection.closeAfterWrite && !connection.inputClosed else {
            close(connection)  // nothing is left to read or to write (flush closes such a one)
            return
        }
        let result: IOResult<Int>
        do {
            result = try Sockets.read(connection.socket.raw, into: scratch.baseAddress!, count: scratch.count)
        } catch {
            close(connection)  // resets: nothing to answer
            return
        }
        guard case .done(let count) = result else { return }
        if count == 0 {
            connection.inputClosed = true
        } else {
            connection.input.append(contentsOf: UnsafeRawBufferPointer(rebasing: scratch[0..<count]))
        }
        answerComplete(connection)
        flush(connection)
    }

    /// Answers every complete request at the head of the input, in order.
    private func answerComplete(_ connection: Connection) {
        var consumed = 0
        defer { if consumed > 0 { connection.input.removeFirst(consumed) } }
        while !connection.closeAfterWrite && consumed < connection.input.count && connection.output.count < Self.outputLimit {
            let outcome = connection.input.withUnsafeBytes { raw in
                RequestHead.parse(UnsafeRawBufferPointer(rebasing: raw[consumed...]))
            }
            switch outcome {
            case .incomplete:
                break
            case .tooLarge:
                refuse(connection, .text(431, "request headers over \(configuration.maxHeaderBytes) bytes", close: true))
                return
            case .invalid:
                refuse(connection, .text(400, "bad request", close: true))
                return
            case .complete(let head, let length):
                if head.chunked {
                    refuse(connection, .text(400, "bad request", close: true))
                    return
                }
                if head.contentLength > configuration.maxBodyBytes {
                    refuse(connection, .text(413, "request body over \(configuration.maxBodyBytes) bytes", close: true))
                    return
                }
                // The body (the admin API takes none, but may be sent one) must have arrived.
                guard connection.input.count - consumed - length >= head.contentLength else { break }
                consumed += length + head.contentLength
                let response = responder.respond(method: head.method, target: head.target, authorization: head.authorization)
                let keepAlive = head.keepAlive && !response.close
                connection.output.append(contentsOf: response.encoded(keepAlive: keepAlive, head: head.method == "HEAD"))
                if !keepAlive { connection.closeAfterWrite = true }
                continue
            }
            break
        }
        // The client closed its side: answer what came, then close.
        if connection.inputClosed { connection.closeAfterWrite = true }
    }

    private func refuse(_ connection: Connection, _ response: StatsResponse) {
        connection.output.append(contentsOf: response.encoded(keepAlive: false, head: false))
        connection.closeAfterWrite = true
    }

    /// Writes what it can; arms the write timeout while answers wait for the client, the request
    /// timeout once they are all written.
    private func flush(_ connection: Connection) {
        let answered = !connection.output.isEmpty
        switch connection.writeOutput() {
        case .failed:
            close(connection)
        case .blocked:
            connection.deadline = MonotonicClock.milliseconds() + configuration.writeTimeout
            if !server.watch(connection, writable: true) { close(connection) }
        case .done:
            if connection.closeAfterWrite { return close(connection) }
            if answered { connection.deadline = MonotonicClock.milliseconds() + configuration.requestTimeout }
            if connection.wantsWrite {
                if !server.watch(connection, writable: false) { return close(connection) }
                // Requests held back while the answers drained.
                answerComplete(connection)
                if !connection.output.isEmpty { flush(connection) }
            }
        }
    }
}
