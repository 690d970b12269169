import ArgumentParser
import BerthEngine
import BerthSystem
import Glibc
import Logging
import Synchronization

/// `--takeover-socket`: restarts that drop nothing (`proxy`, `discover`, `run`). A process
/// started with it first asks whoever listens there for its listening sockets and lease, serves
/// with them, and then listens there itself for its own successor.
struct TakeoverOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [("--takeover-socket", "BERTH_TAKEOVER_SOCKET")]

    @Option(help: EnvironmentFlags.help("Unix socket PATH for restarts that drop nothing: a new process started with the same PATH takes over the running one's listening sockets (and its etcd lease), then the old one stops accepting, drains and exits. Its directory must be shared by both (a bind mount for containers).", "BERTH_TAKEOVER_SOCKET"))
    var takeoverSocket: String?

    /// How long the running process may take to answer.
    static let requestTimeoutMilliseconds = 5_000
    /// How long the first table may take (discovery lists etcd first).
    static let firstTableTimeout: Duration = .seconds(30)

    func validate() throws {
        if let takeoverSocket, takeoverSocket.isEmpty || takeoverSocket.utf8.count > 107 || takeoverSocket.contains("\0") {
            throw invalid("--takeover-socket", takeoverSocket, "a file path of at most 107 bytes")
        }
    }

    var enabled: Bool { takeoverSocket != nil }

    /// Asks the running process for its sockets. nil when the flag is off, nobody answers, or
    /// the answer is unusable (logged: this process then starts as if alone).
    func request() -> IncomingTakeover? {
        guard let takeoverSocket else { return nil }
        do throws(TakeoverError) {
            guard let incoming = try IncomingTakeover.request(
                path: takeoverSocket, version: berthVersion, timeoutMilliseconds: Self.requestTimeoutMilliseconds) else {
                log("takeover: nobody answers on \(takeoverSocket); starting alone")
                return nil
            }
            let offer = incoming.offer
            let versionNote = offer.version == berthVersion ? "" : " (this is \(berthVersion))"
            log("takeover: berth \(offer.version)\(versionNote) hands over \(offer.frontends.count) frontend(s), \(offer.descriptorCount) socket(s), lease \(offer.leaseID.map(String.init) ?? "none")")
            return incoming
        } catch {
            log("warning: takeover via \(takeoverSocket) failed: \(error); starting alone", level: .warning)
            return nil
        }
    }

    /// Gives the offered sockets to `engine` before its first table.
    func adopt(_ incoming: IncomingTakeover?, into engine: Engine) {
        guard let incoming else { return }
        if !engine.adopt(incoming.offer, descriptors: &incoming.descriptors) {
            log("warning: takeover: the engine could not adopt the sockets", level: .warning)
        }
    }

    /// Once the first table is installed (`ready`, polled until `firstTableTimeout`): tells the
    /// running process it was taken over, or that the takeover is off (it carries on).
    /// Sockets no frontend took are closed once the old process let go of them.
    func complete(_ incoming: IncomingTakeover?, engine: Engine, ready: () -> Bool = { true }) {
        guard let incoming else { return }
        let deadline = ContinuousClock.now + Self.firstTableTimeout
        while !ready() && ContinuousClock.now < deadline { usleep(20_000) }
        guard ready() else {
            log("warning: takeover: no routing table within \(Self.firstTableTimeout); the running process carries on", level: .warning)
            incoming.abort(reason: "no routing table within \(Self.firstTableTimeout)")
            _ = engine.closeUnusedAdopted()
            return
        }
        do throws(TakeoverError) {
            try incoming.complete()
            log("takeover complete: the previous process stops accepting and drains")
        } catch {
            log("warning: takeover: cannot tell the previous process (\(error)); both serve until it stops", level: .warning)
        }
        for address in engine.closeUnusedAdopted() {
            log("takeover: closed the inherited listener on \(address) (no frontend of this table listens there)")
        }
    }

    /// Listens on the takeover socket for a successor. On takeover, `taken` is set and the
    /// process gets SIGTERM: the command's usual drain, without revoking the lease.
    func serve(engine: Engine, taken: TakenOver, leaseID: @escaping @Sendable () -> Int64? = { nil }) throws -> TakeoverServer? {
        guard let takeoverSocket else { return nil }
        var settings = TakeoverServer.Settings(path: takeoverSocket, version: berthVersion)
        settings.installTimeoutMilliseconds = Int(Self.firstTableTimeout.components.seconds) * 1000 + 10_000
        do {
            let server = try TakeoverServer(
                settings: settings, engine: engine, leaseID: leaseID,
                log: { log($0) },
                onTakenOver: {
                    taken.flag.store(true, ordering: .releasing)
                    kill(getpid(), SIGTERM)
                })
            log("takeover socket \(takeoverSocket): a successor started with it takes over")
            return server
        } catch {
            throw TakeoverSocketFailure(description: "cannot listen on the takeover socket \(takeoverSocket): \(error)")
        }
    }
}

/// Set once a successor has taken over: the stop that follows keeps the lease and the keys.
final class TakenOver: Sendable {
    let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .acquiring) }
}

struct TakeoverSocketFailure: Error, CustomStringConvertible {
    let description: String
}
