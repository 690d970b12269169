import BerthSystem
import BerthTestSupport
import Glibc
import Synchronization

/// A TCP relay from 127.0.0.1 of the bench's own network namespace to one address inside a
/// test-bed namespace: the bench's etcd client (SwiftNIO makes its sockets on whatever thread
/// connects, so it cannot be switched into a namespace) reaches etcd on the bed through it.
/// The outgoing socket of each connection is made inside the namespace (setns on the relaying
/// thread for that one call); bytes are then copied both ways by one thread per connection.
/// For a handful of control connections, not for load.
final class NamespaceRelay: @unchecked Sendable {
    let address: SocketAddress
    private let namespace: String
    private let target: SocketAddress
    private let listener: CInt
    private let stopping = Atomic<Bool>(false)
    private let lock = Mutex(())
    /// Under `lock`.
    private var threads: [OSThread] = []

    init(namespace: String, target: SocketAddress) throws(BenchError) {
        self.namespace = namespace
        self.target = target
        do {
            var socket = try Sockets.listen(on: SocketAddress(ipv4: (127, 0, 0, 1), port: 0), reusePort: false, backlog: 64)
            do {
                address = try Sockets.localAddress(socket.raw)
            } catch {
                socket.close()
                throw error
            }
            listener = socket.release()
        } catch {
            throw .child("relay into \(namespace): \(error)")
        }
        let thread = OSThread(name: "bench-relay") { [self] in acceptLoop() }
        lock.withLock { _ in threads.append(thread) }
    }

    /// Stops accepting and relaying, joins every thread (each notices within 200 ms), closes.
    func stop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        while let thread = lock.withLock({ _ in threads.popLast() }) { thread.join() }
        close(listener)
    }

    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, 200) == 1 else { continue }
            guard case .done(let client)? = try? Sockets.accept(listener) else { continue }
            let thread = OSThread(name: "bench-relay") { [self] in relay(client) }
            lock.withLock { _ in threads.append(thread) }
        }
    }

    /// Connects inside the namespace, then copies until either side ends; closes both.
    private func relay(_ client: CInt) {
        defer { close(client) }
        let made: Int32? = try? NetworkTestBed.withNetworkNamespace(namespace) { () -> Int32? in
            var connected = false
            guard var socket = try? Sockets.connect(to: target, connected: &connected) else { return nil }
            var poller = pollfd(fd: socket.raw, events: Int16(POLLOUT), revents: 0)
            guard connected || (poll(&poller, 1, 5_000) == 1 && Sockets.pendingError(socket.raw) == 0) else {
                socket.close()
                return nil
            }
            return socket.release()
        }
        guard let upstream = made ?? nil else { return }
        defer { close(upstream) }
        var buffer = [UInt8](repeating: 0, count: 65_536)
        var pollers = [pollfd(fd: client, events: Int16(POLLIN), revents: 0), pollfd(fd: upstream, events: Int16(POLLIN), revents: 0)]
        while !stopping.load(ordering: .relaxed) {
            guard poll(&pollers, 2, 200) >= 0 else { return }
            for index in 0..<2 where pollers[index].revents != 0 {
                let from = pollers[index].fd, to = pollers[1 - index].fd
                guard Self.copy(from: from, to: to, buffer: &buffer) else { return }
            }
        }
    }

    /// One read from `from`, all of it written to `to` (waiting for room); false at the end or
    /// on an error.
    private static func copy(from: CInt, to: CInt, buffer: inout [UInt8]) -> Bool {
        buffer.withUnsafeMutableBytes { raw -> Bool in
            let count = read(from, raw.baseAddress, raw.count)
            if count < 0 { return errno == EAGAIN || errno == EINTR }
            guard count > 0 else { return false }
            var sent = 0
            while sent < count {
                let written = send(to, raw.baseAddress! + sent, count - sent, Int32(MSG_NOSIGNAL))
                if written > 0 {
                    sent += written
                } else if written < 0 && (errno == EAGAIN || errno == EINTR) {
                    var poller = pollfd(fd: to, events: Int16(POLLOUT), revents: 0)
                    guard poll(&poller, 1, 5_000) == 1 else { return false }
                } else {
                    return false
                }
            }
            return true
        }
    }
}
