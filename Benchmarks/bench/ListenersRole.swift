import BerthSystem
import Glibc
import Synchronization

/// `--role listeners --count N`: N listening sockets on 127.0.0.1 (kernel-chosen ports) that
/// accept every connection and close it at once: the check targets of the checks scenario.
///
/// Contract with the bench: on stdout one `ports P1,P2,...` line, then `ready`. Each byte the
/// bench writes on stdin is answered with one `accepted N` line (connections accepted so far),
/// so the bench can count checks exactly; end of file on stdin, SIGTERM or SIGINT stop the role.
/// Threads: one accept loop (epoll), one stdin reader, and the main thread waiting for signals.
enum ListenersRole {
    /// Bound on the accepts per readiness event of one listener (the next wait picks up the rest).
    static let acceptsPerEvent = 64
    /// Bound on the queries answered over the role's life.
    static let queryLimit = 1_000_000

    /// Shared by the role's threads.
    final class Shared: Sendable {
        let accepted = Atomic<UInt64>(0)
        let stopping = Atomic<Bool>(false)
    }

    static func run(_ options: RoleOptions) throws(BenchError) {
        let needed = options.count + 64
        guard openFileLimit() >= needed else {
            throw .child("listeners: \(options.count) sockets need an open-file limit of at least \(needed) (it is \(openFileLimit()))")
        }
        var listeners: [CInt] = []
        var ports: [UInt16] = []
        do throws(SystemError) {
            for _ in 0..<options.count {
                var socket = try Sockets.listen(on: SocketAddress(ipv4: (127, 0, 0, 1), port: 0), reusePort: false, backlog: 128)
                ports.append(try Sockets.localAddress(socket.raw).port)
                listeners.append(socket.release())
            }
        } catch {
            for fd in listeners { Glibc.close(fd) }
            throw .system(error)
        }
        defer { for fd in listeners { Glibc.close(fd) } }
        let shared = Shared()
        let fds = listeners
        let acceptor = OSThread(name: "bench-listeners") { acceptLoop(fds, shared) }
        writeOut("ports " + ports.map { "\($0)" }.joined(separator: ",") + "\nready\n")
        _ = OSThread(name: "bench-queries") { answerQueries(shared) }
        _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        shared.stopping.store(true, ordering: .relaxed)
        acceptor.join()
    }

    /// Accepts and closes, until `stopping` (checked at least every 100 ms).
    private static func acceptLoop(_ listeners: [CInt], _ shared: Shared) {
        guard let epoll = try? Epoll(capacity: 256) else {
            progress("listeners: epoll_create failed")
            kill(getpid(), SIGTERM)
            return
        }
        do {
            for (index, fd) in listeners.enumerated() { try epoll.add(fd, events: Epoll.readable, token: UInt64(index)) }
        } catch {
            progress("listeners: \(error)")
            kill(getpid(), SIGTERM)
            return
        }
        while !shared.stopping.load(ordering: .relaxed) {
            let ready = (try? epoll.wait(timeout: 100)) ?? 0
            for index in 0..<ready {
                let token = Int(epoll.event(at: index).token)
                guard token < listeners.count else { continue }
                for _ in 0..<acceptsPerEvent {
                    guard case .done(let fd)? = try? Sockets.accept(listeners[token]) else { break }
                    Glibc.close(fd)
                    shared.accepted.add(1, ordering: .relaxed)
                }
            }
        }
        for fd in listeners { epoll.remove(fd) }
    }

    /// Answers each byte on stdin with the accept count; end of file stops the role.
    private static func answerQueries(_ shared: Shared) {
        var byte: UInt8 = 0
        for _ in 0..<queryLimit {
            let count = Glibc.read(0, &byte, 1)
            if count < 0 && errno == EINTR { continue }
            guard count == 1 else { break }
            writeOut("accepted \(shared.accepted.load(ordering: .relaxed))\n")
        }
        kill(getpid(), SIGTERM)
    }
}
