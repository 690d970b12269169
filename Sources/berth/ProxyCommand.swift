import ArgumentParser
import BerthEngine
import BerthSystem
import BerthHealth
import BerthStats
import Glibc

/// `berth proxy`: a complete static TCP load balancer: one frontend, round-robin over the
/// given backends, with retries, timeouts and graceful stop.
struct ProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy",
        abstract: "Balance TCP connections from one listening address over static backends.",
        discussion: """
            Each new connection goes to the next backend in a smooth weighted round-robin (one rotation across \
            all workers). A backend that refuses or does not answer in time is skipped and the next \
            one is tried (--retries); the client's bytes are not read until a backend is connected, \
            so nothing is lost. SIGTERM or SIGINT stops accepting, lets open connections finish for \
            up to --drain-timeout, and exits 0. Durations are written as HAProxy writes them: \
            200ms, 2s, 1m (a bare number is milliseconds).
            """)

    static let environment = EnvironmentFlags(command: "proxy", flags: [
        ("--listen", "BERTH_LISTEN"), ("--backend", "BERTH_BACKENDS"), ("--name", "BERTH_NAME"),
    ] + ProxyOptions.environment + HealthOptions.environment + StatsOptions.environment + LoggingOptions.environment
        + TakeoverOptions.environment, switches: ProxyOptions.switches)

    @Option(help: EnvironmentFlags.help("Address to listen on, HOST:PORT ([::1]:8000 for IPv6, *:8000 for all).", "BERTH_LISTEN"), transform: AddressArgument.parse)
    var listen: AddressArgument?

    @Option(help: EnvironmentFlags.help("A backend HOST:PORT, or HOST:PORT*WEIGHT (0 to 256, default 1: its share of new connections in a smooth weighted rotation; 0 takes none); repeat the flag or separate with commas.", "BERTH_BACKENDS"), transform: AddressListArgument.parse)
    var backend: [AddressListArgument] = []

    @Option(help: EnvironmentFlags.help("Name of the frontend in statistics and logs.", "BERTH_NAME"))
    var name: String = "proxy"

    @OptionGroup(title: "Proxying")
    var proxy: ProxyOptions

    @OptionGroup(title: "Health checks")
    var health: HealthOptions

    @OptionGroup(title: "Stats and admin")
    var stats: StatsOptions

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    @OptionGroup(title: "Restarts")
    var takeover: TakeoverOptions

    func validate() throws {
        if listen == nil { throw ValidationError("--listen HOST:PORT is required") }
        if backend.isEmpty { throw ValidationError("at least one --backend HOST:PORT is required") }
    }

    func run() throws {
        guard let listen else { throw ValidationError("--listen HOST:PORT is required") }
        ProcessSignals.block([SIGTERM, SIGINT])
        let configuration = proxy.engineConfiguration(observeErrors: health.observeErrors)
        let settings = proxy.frontendSettings
        let backends = backend.flatMap(\.backends)
        let incoming = takeover.request()
        let router = try HealthRouter.make(configuration: configuration, policy: health.policy)
        takeover.adopt(incoming, into: router.engine)
        let result = try router.apply(RoutingTable(frontends: [
            Frontend(name: name, listen: listen.address, backends: backends, settings: settings),
        ]))
        if let failure = result.failures[name] {
            incoming?.abort(reason: "cannot listen on \(listen.address)")
            router.shutdown(drainTimeout: 0)
            throw ListenFailure(address: listen.address, error: failure)
        }
        takeover.complete(incoming, engine: router.engine)
        let bound = result.listening[name]!
        let statsServer: StatsServer?
        let taken = TakenOver()
        let takeoverServer: TakeoverServer?
        do {
            statsServer = try stats.start(provider: .router(router), reusePort: takeover.enabled)
            takeoverServer = try takeover.serve(engine: router.engine, taken: taken)
        } catch {
            router.shutdown(drainTimeout: 0)
            throw error
        }
        log("listening on \(bound) (\(name)): \(backends.count) backend(s), \(proxy.summary(configuration)), checks \(health.summary)")
        // The stats page stays up while connections drain, so the drain can be watched.
        proxy.waitForSignalThenDrain(router, taken: taken, beforeDrain: { takeoverServer?.stop() }, afterDrain: { statsServer?.stop() })
    }
}

/// `--retry-on`: the kinds of backend failure after which a session moves to the next backend
/// with the client's first bytes replayed, as a comma-separated list (HAProxy's `retry-on`).
struct RetryOn: ExpressibleByArgument, Equatable, CustomStringConvertible {
    /// The backend closed or reset before its first byte.
    var emptyResponse = false
    /// The backend sent nothing within --first-byte-timeout of the client's first byte.
    var responseTimeout = false

    static let none = RetryOn()
    static let names = ["none", "empty-response", "response-timeout"]

    init() {}

    init?(argument: String) {
        for item in argument.split(separator: ",", omittingEmptySubsequences: false) {
            switch item.trimmingCharacters(in: " ") {
            case "none": continue
            case "empty-response": emptyResponse = true
            case "response-timeout": responseTimeout = true
            default: return nil
            }
        }
    }

    static var allValueStrings: [String] { names }

    var description: String {
        let kinds = [emptyResponse ? "empty-response" : nil, responseTimeout ? "response-timeout" : nil].compactMap { $0 }
        return kinds.isEmpty ? "none" : kinds.joined(separator: ",")
    }
    var defaultValueDescription: String { description }
}

struct ListenFailure: Error, CustomStringConvertible {
    let address: SocketAddress
    let error: SystemError
    var description: String { "cannot listen on \(address): \(error)" }
}

extension Substring {
    func trimmingCharacters(in set: Character) -> Substring {
        var slice = self
        while slice.first == set { slice = slice.dropFirst() }
        while slice.last == set { slice = slice.dropLast() }
        return slice
    }
}
