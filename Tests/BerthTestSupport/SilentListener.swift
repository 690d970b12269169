// A backend that accepts and never answers: the kernel completes the handshake, a thread
// accepts, and the sockets are held (never read, never written, never closed) until stop().
// Health checks that only connect find it healthy; every request sent to it waits forever.
import BerthSystem
import Foundation
import Glibc
import Synchronization

public final class SilentListener: @unchecked Sendable {
    /// Connections held at most; past it, connections stay in the listen backlog (still no answer).
    public static let maximumHeld = 4096

    public let host: String
    public let port: Int
    private let listener: CInt
    private let held = Mutex<[CInt]>([])
    private let stopping = Atomic<Bool>(false)
    private var thread: OSThread?

    /// Listens on `host:port` (IPv4; port 0: any free port) in the calling thread's network
    /// namespace: inside `NetworkTestBed.withNetwork(of:)` it belongs to that host.
    public init(host: String, port: Int) throws {
        self.host = host
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FixtureFailure("socket: \(String(cString: strerror(errno)))") }
        var on: CInt = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, socklen_t(MemoryLayout<CInt>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else {
            close(fd)
            throw FixtureFailure("SilentListener: '\(host)' is not an IPv4 address")
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 1024) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw FixtureFailure("SilentListener on \(host):\(port): \(reason)")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        self.port = Int(UInt16(bigEndian: address.sin_port))
        listener = fd
        thread = OSThread(name: "silent-\(self.port)") { [self] in acceptLoop() }
    }

    deinit { stop() }

    /// Connections accepted so far (and held).
    public var accepted: Int { held.withLock { $0.count } }

    /// Stops accepting, closes the listener and every held connection. Idempotent.
    public func stop() {
        // The first call flips `stopping` (what the thread polls) and does the rest.
        guard stopping.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        thread?.join()
        thread = nil
        close(listener)
        for fd in held.withLock({ fds in defer { fds = [] }; return fds }) { close(fd) }
    }

    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            var descriptor = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, 50) > 0 else { continue }
            guard held.withLock({ $0.count }) < Self.maximumHeld else {
                usleep(50_000)
                continue
            }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { continue }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)  // accept4 is GNU-only: not in Glibc's module
            held.withLock { $0.append(fd) }
        }
    }
}
