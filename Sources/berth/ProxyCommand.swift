import ArgumentParser
import BerthEngine
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
            Each new connection goes to the next backend in round-robin order (one rotation across \
            all workers). A backend that refuses or does not answer in time is skipped and the next \
            one is tried (--retries); the client's bytes are not read until a backend is connected, \
            so nothing is lost. SIGTERM or SIGINT stops accepting, lets open connections finish for \
            up to --drain-timeout, and exits 0. Durations are written as HAProxy writes them: \
            200ms, 2s, 1m (a bare number is milliseconds).
            """)

    static let environment = EnvironmentFlags(command: "proxy", flags: [
        ("--listen", "BERTH_LISTEN"), ("--backend", "BERTH_BACKENDS"), ("--name", "BERTH_NAME"),
        ("--workers", "BERTH_WORKERS"), ("--retries", "BERTH_RETRIES"),
        ("--connect-timeout", "BERTH_CONNECT_TIMEOUT"), ("--client-timeout", "BERTH_CLIENT_TIMEOUT"),
        ("--server-timeout", "BERTH_SERVER_TIMEOUT"), ("--drain-timeout", "BERTH_DRAIN_TIMEOUT"),
        ("--maxconn", "BERTH_MAXCONN"), ("--relay", "BERTH_RELAY"), ("--pipe-size", "BERTH_PIPE_SIZE"),
        ("--cpus", "BERTH_CPUS"), ("--retry-on", "BERTH_RETRY_ON"),
    ] + HealthOptions.environment + StatsOptions.environment)

    @Option(help: EnvironmentFlags.help("Address to listen on, HOST:PORT ([::1]:8000 for IPv6, *:8000 for all).", "BERTH_LISTEN"), transform: AddressArgument.parse)
    var listen: AddressArgument?

    @Option(help: EnvironmentFlags.help("A backend HOST:PORT; repeat the flag or separate with commas.", "BERTH_BACKENDS"), transform: AddressListArgument.parse)
    var backend: [AddressListArgument] = []

    @Option(help: EnvironmentFlags.help("Name of the frontend in statistics and logs.", "BERTH_NAME"))
    var name: String = "proxy"

    @Option(help: EnvironmentFlags.help("Worker threads, each with its own event loop (default: the number of CPUs).", "BERTH_WORKERS"))
    var workers: Int?

    @Option(help: EnvironmentFlags.help("Further backends to try when a connect fails.", "BERTH_RETRIES"))
    var retries: Int = 3

    @Option(help: EnvironmentFlags.help("Give up a backend connect after this long (then retry elsewhere).", "BERTH_CONNECT_TIMEOUT"), transform: DurationArgument.parse)
    var connectTimeout = DurationArgument(milliseconds: 5_000)

    @Option(help: EnvironmentFlags.help("Close a connection whose client side moved no byte for this long.", "BERTH_CLIENT_TIMEOUT"), transform: DurationArgument.parse)
    var clientTimeout = DurationArgument(milliseconds: 60_000)

    @Option(help: EnvironmentFlags.help("Close a connection whose backend side moved no byte for this long.", "BERTH_SERVER_TIMEOUT"), transform: DurationArgument.parse)
    var serverTimeout = DurationArgument(milliseconds: 60_000)

    @Option(help: EnvironmentFlags.help("On SIGTERM/SIGINT, how long open connections may still run.", "BERTH_DRAIN_TIMEOUT"), transform: DurationArgument.parse)
    var drainTimeout = DurationArgument(milliseconds: 30_000)

    @Option(help: EnvironmentFlags.help("Most client connections open at once; past it, accepting pauses (default: half the open-file limit).", "BERTH_MAXCONN"))
    var maxconn: Int?

    @Option(help: EnvironmentFlags.help("How bytes are moved: splice (zero-copy through pipes), copy (read/write), auto (copy, then splice once a read is large).", "BERTH_RELAY"))
    var relay: RelayMode = .auto

    @Option(help: EnvironmentFlags.help("Pipe capacity in bytes for the splice relay (0: the kernel's default, 64 KiB).", "BERTH_PIPE_SIZE"))
    var pipeSize: Int = 0

    @Option(help: EnvironmentFlags.help("Pin worker threads to these CPUs, comma separated (worker i on the i-th).", "BERTH_CPUS"))
    var cpus: String?

    @Option(help: EnvironmentFlags.help("Also retry when a backend closes or resets before its first byte: empty-response (replays the client's first 16 KiB; only for protocols whose first request is safe to repeat), or none.", "BERTH_RETRY_ON"))
    var retryOn: RetryOn = .none

    @OptionGroup(title: "Health checks")
    var health: HealthOptions

    @OptionGroup(title: "Stats and admin")
    var stats: StatsOptions

    func validate() throws {
        if listen == nil { throw ValidationError("--listen HOST:PORT is required") }
        if backend.isEmpty { throw ValidationError("at least one --backend HOST:PORT is required") }
        if let workers, workers < 1 || workers > 256 { throw invalid("--workers", "\(workers)", "a number from 1 to 256") }
        if retries < 0 || retries > 100 { throw invalid("--retries", "\(retries)", "a number from 0 to 100") }
        if let maxconn, maxconn < 1 { throw invalid("--maxconn", "\(maxconn)", "a positive number") }
        if pipeSize < 0 { throw invalid("--pipe-size", "\(pipeSize)", "a size in bytes, 0 for the default") }
        if let cpus, parsedCPUs(cpus) == nil { throw invalid("--cpus", cpus, "CPU numbers separated by commas") }
        if connectTimeout.milliseconds < 1 { throw invalid("--connect-timeout", "\(connectTimeout)", "a positive duration") }
    }

    private func parsedCPUs(_ text: String) -> [Int]? {
        let values = text.split(separator: ",").map { Int($0.trimmingCharacters(in: " ")) }
        guard !values.isEmpty, values.allSatisfy({ $0 != nil && $0! >= 0 }) else { return nil }
        return values.map { $0! }
    }

    func run() throws {
        guard let listen else { throw ValidationError("--listen HOST:PORT is required") }
        ProcessSignals.block([SIGTERM, SIGINT])
        var configuration = EngineConfiguration()
        configuration.workers = workers ?? availableCPUCount()
        configuration.relay = relay
        configuration.drainTimeout = drainTimeout.milliseconds
        configuration.pipeSize = pipeSize
        if let maxconn { configuration.maxConnections = maxconn }
        if let cpus { configuration.cpus = parsedCPUs(cpus) ?? [] }
        configuration.observeErrors = health.observeErrors
        let settings = FrontendSettings(
            retries: retries, connectTimeout: connectTimeout.milliseconds,
            clientTimeout: clientTimeout.milliseconds, serverTimeout: serverTimeout.milliseconds,
            retryOnEmptyResponse: retryOn == .emptyResponse)
        let backends = backend.flatMap(\.addresses).map(Backend.init)
        let router = try HealthRouter.make(configuration: configuration, policy: health.policy)
        let engine = router.engine
        let result = try router.apply(RoutingTable(frontends: [
            Frontend(name: name, listen: listen.address, backends: backends, settings: settings),
        ]))
        if let failure = result.failures[name] {
            router.shutdown(drainTimeout: 0)
            throw ListenFailure(address: listen.address, error: failure)
        }
        let bound = result.listening[name]!
        let statsServer: StatsServer?
        do {
            statsServer = try stats.start(provider: .router(router))
        } catch {
            router.shutdown(drainTimeout: 0)
            throw error
        }
        log("listening on \(bound) (\(name)): \(backends.count) backend(s), \(configuration.workers) worker(s), relay \(relay.rawValue), maxconn \(configuration.maxConnections), checks \(health.summary)")
        let signal = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        log("signal \(signal): stopping; draining \(engine.openConnections) connection(s) for up to \(drainTimeout)")
        // A second signal ends the drain at once.
        _ = OSThread(name: "berth-signals") {
            _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
            log("second signal: exiting without waiting")
            _exit(1)
        }
        // The stats page stays up while connections drain, so the drain can be watched.
        router.shutdown(drainTimeout: drainTimeout.milliseconds)
        statsServer?.stop()
        log("stopped")
    }
}

enum RetryOn: String, ExpressibleByArgument, CaseIterable {
    case none
    case emptyResponse = "empty-response"
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
