// A peer that drops SYNs, on loopback: what a dead or cut-off host does to a connect.
import BerthSystem
import Foundation
import Glibc

/// A listener whose accept queue is full and never accepted from: the kernel drops further
/// SYNs, so a connect to `address` stays in progress until its timeout, as to a host that died
/// or is cut off. Owns the listener and the connections filling its queue; `close()` (or deinit)
/// closes them.
public final class SynDroppingListener: @unchecked Sendable {
    public let address: SocketAddress
    private var descriptors: [CInt]

    public init(host: String = "127.0.0.1") throws {
        var listener = try Sockets.listen(on: try SocketAddress(parsing: "\(host):0"), reusePort: false, backlog: 0)
        do {
            address = try Sockets.localAddress(listener.raw)
        } catch {
            listener.close()
            throw error
        }
        descriptors = [listener.release()]
        // A backlog of 0 holds one connection; three make sure the queue is full.
        for _ in 0..<3 {
            var connected = false
            do {
                var filler = try Sockets.connect(to: address, connected: &connected)
                descriptors.append(filler.release())
            } catch {
                close()
                throw error
            }
        }
        usleep(50_000)  // the handshakes complete, the queue fills
    }

    public func close() {
        for fd in descriptors { Glibc.close(fd) }
        descriptors = []
    }

    deinit { close() }
}

/// fd number → what it points to, from /proc/self/fd (the fd-leak checks around tests).
public func openDescriptorMap() -> [String: String] {
    var result: [String: String] = [:]
    for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
        result[name] = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)")) ?? "?"
    }
    return result
}
