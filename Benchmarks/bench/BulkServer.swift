import BerthSystem
import Glibc
import Synchronization

/// The bulk backend: every accepted connection gets a stream of bytes written as fast as it takes
/// them (`chunkSize` at a time, from one buffer), until the peer closes or `byteLimit` bytes were
/// sent (then the server closes it). Whatever the peer sends is read and dropped.
///
/// One thread with its own level-triggered epoll loop; `stop` may be called from any thread.
final class BulkServer: Sendable {
    /// The address bound (port 0 resolved).
    let address: SocketAddress
    private let stopSignal: WakeupSignal
    private let thread: Mutex<pthread_t?>

    init(listen: SocketAddress, chunkSize: Int = 256 * 1024, byteLimit: UInt64 = 256 << 30) throws(SystemError) {
        var socket = try Sockets.listen(on: listen, reusePort: false)
        do {
            address = try Sockets.localAddress(socket.raw)
            stopSignal = try WakeupSignal()
        } catch {
            socket.close()
            throw error
        }
        let listener = socket.release()
        let signal = stopSignal
        thread = Mutex(nil)
        let started = OSThread(name: "bulk") {
            BulkLoop(listener: listener, stop: signal, chunkSize: chunkSize, byteLimit: byteLimit).run()
        }
        thread.withLock { $0 = started.handle }
    }

    /// Closes every connection and the listener, and waits for the thread. Idempotent.
    func stop() {
        guard let handle = thread.withLock({ current -> pthread_t? in
            defer { current = nil }
            return current
        }) else { return }
        stopSignal.wake()
        pthread_join(handle, nil)
    }
}

/// The loop of `BulkServer`, on its own thread. Epoll tokens are `generation << 32 | fd`, so an
/// event queued for a connection that was closed (its fd maybe reused) is dropped.
private final class BulkLoop {
    private final class Stream {
        var socket: Descriptor
        let generation: UInt32
        var sent: UInt64 = 0

        init(fd: CInt, generation: UInt32) {
            socket = Descriptor(adopting: fd)
            self.generation = generation
        }
    }

    private static let listenerToken = UInt64.max
    private static let stopToken = UInt64.max - 1
    /// Bounds per wake-up: connections accepted, chunks written and reads of one connection.
    private static let acceptBurst = 64
    private static let writesPerWakeup = 16
    private static let readsPerWakeup = 4

    private var listener: Descriptor
    private let stop: WakeupSignal
    private let epoll: Epoll
    private let chunk: UnsafeMutableRawBufferPointer
    private let byteLimit: UInt64
    private var streams: [CInt: Stream] = [:]
    private var nextGeneration: UInt32 = 1

    init(listener: CInt, stop: WakeupSignal, chunkSize: Int, byteLimit: UInt64) {
        self.listener = Descriptor(adopting: listener)
        self.stop = stop
        self.byteLimit = byteLimit
        chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 64)
        chunk.initializeMemory(as: UInt8.self, repeating: UInt8(ascii: "x"))
        do {
            epoll = try Epoll(capacity: 64)
            try epoll.add(listener, events: Epoll.readable, token: Self.listenerToken)
            try epoll.add(stop.fd, events: Epoll.readable, token: Self.stopToken)
        } catch {
            fatalError("bulk server: \(error)")
        }
    }

    deinit {
        chunk.deallocate()
    }

    func run() {
        loop: while true {
            let count: Int
            do {
                count = try epoll.wait(timeout: -1)
            } catch {
                progress("bulk server: \(error)")
                break
            }
            for index in 0..<count {
                let (events, token) = epoll.event(at: index)
                if token == Self.stopToken { break loop }
                if token == Self.listenerToken {
                    acceptConnections()
                    continue
                }
                let fd = CInt(truncatingIfNeeded: token & 0xFFFF_FFFF)
                guard let stream = streams[fd], UInt64(stream.generation) == token >> 32 else { continue }
                if events & (Epoll.readable | Epoll.hangup | Epoll.error) != 0 && !drainInput(stream) { continue }
                if events & Epoll.writable != 0 { send(stream) }
            }
        }
        for stream in streams.values { close(stream) }
        epoll.remove(listener.raw)
        epoll.remove(stop.fd)
        listener.close()
    }

    private func acceptConnections() {
        for _ in 0..<Self.acceptBurst {
            guard case .done(let fd)? = try? Sockets.accept(listener.raw) else { return }
            let stream = Stream(fd: fd, generation: nextGeneration)
            nextGeneration &+= 1
            do {
                try epoll.add(fd, events: Epoll.readable | Epoll.writable,
                              token: UInt64(stream.generation) << 32 | UInt64(UInt32(bitPattern: fd)))
            } catch {
                stream.socket.close()
                continue
            }
            streams[fd] = stream
        }
    }

    /// Reads and drops what the peer sent; false when the connection ended (and was closed).
    private func drainInput(_ stream: Stream) -> Bool {
        for _ in 0..<Self.readsPerWakeup {
            switch try? Sockets.read(stream.socket.raw, into: chunk.baseAddress!, count: min(chunk.count, 65536)) {
            case .done(let count)? where count > 0:
                continue
            case .wouldBlock?:
                return true
            default:  // end of file, reset
                close(stream)
                return false
            }
        }
        return true
    }

    private func send(_ stream: Stream) {
        for _ in 0..<Self.writesPerWakeup {
            let count = Int(min(UInt64(chunk.count), byteLimit - stream.sent))
            switch try? Sockets.write(stream.socket.raw, from: chunk.baseAddress!, count: count) {
            case .done(let written)?:
                stream.sent += UInt64(written)
                if stream.sent >= byteLimit {
                    close(stream)
                    return
                }
            case .wouldBlock?:
                return
            case nil:  // reset or broken pipe: the reader went away
                close(stream)
                return
            }
        }
    }

    private func close(_ stream: Stream) {
        let fd = stream.socket.raw
        epoll.remove(fd)
        streams[fd] = nil
        stream.socket.close()
    }
}
