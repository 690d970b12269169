import BerthSystem
import Glibc
import Synchronization

/// The running process's side of a takeover: a thread (`berth-takeover`) that listens on the
/// takeover socket and, to a new process that asks, hands over the engine's listening sockets
/// and the lease (`TakeoverMessage`). One peer at a time; each step bounded by a timeout.
///
/// When the new process says `taken-over`, the thread closes its socket (leaving the file to
/// the new process, which binds it again) and calls `onTakenOver` once: the caller stops its
/// registration without revoking the lease, shuts the engine down (it stops accepting and
/// drains) and exits. Anything else (garbage, a peer that goes silent, an abort) is logged and
/// the process carries on serving.
public final class TakeoverServer: Sendable {
    public struct Settings: Sendable {
        public var path: String
        public var version: String
        /// How long a peer may take to say hello and to read the offer.
        public var peerTimeoutMilliseconds = 5_000
        /// How long the new process may take to install its first table (it lists etcd).
        public var installTimeoutMilliseconds = 60_000

        public init(path: String, version: String) {
            self.path = path
            self.version = version
        }
    }

    private let settings: Settings
    private let flags = Flags()
    private let thread: Mutex<OSThread?> = Mutex(nil)
    /// The socket file's identity when we bound it: only that file is ours to unlink.
    private let boundFile: (device: UInt64, inode: UInt64)

    /// Binds `settings.path` (a stale file there is replaced) and starts the thread.
    public init(
        settings: Settings, engine: Engine, leaseID: @escaping @Sendable () -> Int64?,
        log: @escaping @Sendable (String) -> Void, onTakenOver: @escaping @Sendable () -> Void
    ) throws(SystemError) {
        self.settings = settings
        var listener = try UnixSockets.listen(path: settings.path)
        var status = stat()
        if stat(settings.path, &status) == 0 {
            boundFile = (UInt64(status.st_dev), UInt64(status.st_ino))
        } else {
            boundFile = (0, 0)
        }
        let fd = listener.release()
        let server = Handler(settings: settings, engine: engine, leaseID: leaseID, log: log)
        let flags = self.flags
        thread.withLock {
            $0 = OSThread(name: "berth-takeover") {
                var owned = Descriptor(adopting: fd)
                while !flags.stopRequested.load(ordering: .relaxed) {
                    if server.serveOne(listener: owned.raw) {
                        flags.takenOver.store(true, ordering: .relaxed)
                        owned.close()
                        onTakenOver()
                        return
                    }
                }
                owned.close()
            }
        }
    }

    /// Stops the thread. Unlinks the socket file unless a successor has (or may have) bound
    /// its own there.
    public func stop() {
        flags.stopRequested.store(true, ordering: .relaxed)
        let running = thread.withLock { thread in
            let current = thread
            thread = nil
            return current
        }
        running?.join()
        guard !flags.takenOver.load(ordering: .relaxed) else { return }
        var status = stat()
        if stat(settings.path, &status) == 0, UInt64(status.st_dev) == boundFile.device, UInt64(status.st_ino) == boundFile.inode {
            unlink(settings.path)
        }
    }

    private final class Flags: Sendable {
        let stopRequested = Atomic<Bool>(false)
        let takenOver = Atomic<Bool>(false)
    }

    /// One peer, start to end, on the server's thread.
    private struct Handler: Sendable {
        let settings: Settings
        let engine: Engine
        let leaseID: @Sendable () -> Int64?
        let log: @Sendable (String) -> Void

        /// Waits a little for a peer and serves it; true when it took over.
        func serveOne(listener: CInt) -> Bool {
            var connection: Descriptor
            do {
                guard let accepted = try UnixSockets.accept(listener, timeoutMilliseconds: 250,
                                                            peerTimeoutMilliseconds: settings.peerTimeoutMilliseconds) else { return false }
                connection = accepted
            } catch {
                log("takeover socket: \(error)")
                usleep(100_000)
                return false
            }
            defer { connection.close() }
            do throws(TakeoverError) {
                return try hand(over: connection.raw)
            } catch {
                log("takeover refused: \(error); still serving")
                return false
            }
        }

        private func hand(over fd: CInt) throws(TakeoverError) -> Bool {
            let hello = try TakeoverWire.receive(fd)
            guard case .hello(let protocolVersion, let version) = hello else { throw .unexpected("\(hello)") }
            guard protocolVersion == TakeoverMessage.protocolVersion else {
                // Answered with our offer header only, so that the peer can say why it stops.
                try TakeoverWire.send(fd, .offer(TakeoverOffer(version: settings.version)))
                throw .protocolMismatch(protocolVersion, version: version)
            }
            var descriptors = DescriptorBatch()
            defer { descriptors.close() }
            let offer: TakeoverOffer
            do {
                offer = try engine.exportListeners(version: settings.version, leaseID: leaseID(), into: &descriptors)
            } catch {
                throw .system(error)
            }
            try TakeoverWire.send(fd, .offer(offer))
            try TakeoverWire.sendDescriptors(fd, descriptors.fds)
            descriptors.close()
            log("takeover: \(offer.frontends.count) frontend(s), \(offer.descriptorCount) socket(s) and lease \(offer.leaseID.map(String.init) ?? "none") handed to berth \(version); waiting for it to take over")
            do {
                try UnixSockets.setTimeout(fd, milliseconds: settings.installTimeoutMilliseconds)
            } catch {
                throw .system(error)
            }
            let answer = try TakeoverWire.receive(fd)
            switch answer {
            case .takenOver:
                log("taken over by berth \(version): no longer accepting; draining")
                return true
            case .abort(let reason):
                log("takeover aborted by the new process: \(reason); still serving")
                return false
            default:
                throw .unexpected("\(answer)")
            }
        }
    }
}
