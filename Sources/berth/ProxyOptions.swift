import ArgumentParser
import BerthEngine
import BerthSystem
import BerthHealth
import Glibc

/// The data-plane flags shared by every command that proxies (`proxy`, `discover`, `run`, `dev`).
struct ProxyOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [
        ("--workers", "BERTH_WORKERS"), ("--retries", "BERTH_RETRIES"),
        ("--connect-timeout", "BERTH_CONNECT_TIMEOUT"), ("--client-timeout", "BERTH_CLIENT_TIMEOUT"),
        ("--server-timeout", "BERTH_SERVER_TIMEOUT"), ("--drain-timeout", "BERTH_DRAIN_TIMEOUT"),
        ("--maxconn", "BERTH_MAXCONN"), ("--relay", "BERTH_RELAY"), ("--pipe-size", "BERTH_PIPE_SIZE"),
        ("--cpus", "BERTH_CPUS"), ("--retry-on", "BERTH_RETRY_ON"),
        ("--first-byte-timeout", "BERTH_FIRST_BYTE_TIMEOUT"), ("--log-format", "BERTH_LOG_FORMAT"),
        ("--send-proxy", "BERTH_SEND_PROXY"), ("--balance", "BERTH_BALANCE"), ("--slow-start", "BERTH_SLOW_START"),
    ]
    static let switches: [(flag: String, variable: String)] = [("--log-connections", "BERTH_LOG_CONNECTIONS")]

    @Option(help: EnvironmentFlags.help("Worker threads, each with its own event loop (default: the CPUs this process may run on: its affinity mask, capped by its cgroup CPU quota).", "BERTH_WORKERS"))
    var workers: Int?

    @Option(help: EnvironmentFlags.help("Further backends to try when a connect fails.", "BERTH_RETRIES"))
    var retries: Int = 3

    @Option(help: EnvironmentFlags.help("Give up a backend connect after this long (then retry elsewhere).", "BERTH_CONNECT_TIMEOUT"), transform: DurationArgument.parse)
    var connectTimeout = DurationArgument(milliseconds: 5_000)

    @Option(help: EnvironmentFlags.help("Close a connection whose client side moved no byte for this long (0: never).", "BERTH_CLIENT_TIMEOUT"), transform: DurationArgument.parse)
    var clientTimeout = DurationArgument(milliseconds: 60_000)

    @Option(help: EnvironmentFlags.help("Close a connection whose backend side moved no byte for this long (0: never).", "BERTH_SERVER_TIMEOUT"), transform: DurationArgument.parse)
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

    @Option(help: EnvironmentFlags.help("Also move a connection to the next backend, replaying the client's first 16 KiB, when its backend fails before answering: empty-response (it closed or reset before its first byte), response-timeout (it sent nothing within --first-byte-timeout), both comma separated, or none. Only for protocols whose first request is safe to repeat; never when the client closed first.", "BERTH_RETRY_ON"))
    var retryOn: RetryOn = .none

    @Option(help: EnvironmentFlags.help("With --retry-on response-timeout: how long a backend may stay silent after the client's first byte before the connection moves on.", "BERTH_FIRST_BYTE_TIMEOUT"), transform: DurationArgument.parse)
    var firstByteTimeout = DurationArgument(milliseconds: 2_000)

    @Option(help: EnvironmentFlags.help("How a new connection picks its backend: roundrobin (smooth weighted round-robin, one rotation over all workers), leastconn (the fewest open connections over all workers, relative to weight), source (a consistent hash of the client's address: a client keeps its backend, and a backend added or removed moves only its share of clients). Per service: \"balance\" in its _config.", "BERTH_BALANCE"))
    var balance: BalanceMode = .roundRobin

    @Option(help: EnvironmentFlags.help("A backend that comes up (added to a running service, or back from down, drain or maintenance) ramps from a thousandth of its weight to all of it over this long, so that a cold backend is not flooded (HAProxy's slowstart; 0: at once). Per service: \"slow_start\" in its _config.", "BERTH_SLOW_START"), transform: DurationArgument.parse)
    var slowStart = DurationArgument(milliseconds: 0)

    @Option(help: EnvironmentFlags.help("Write a PROXY protocol header (v1 text or v2 binary, as HAProxy's send-proxy and send-proxy-v2) to each backend before the client's first byte, so that it sees the client's address; none to send none. Per service: \"send_proxy\" in its _config.", "BERTH_SEND_PROXY"))
    var sendProxy: SendProxyArgument = .none

    @Flag(help: EnvironmentFlags.help("Log one line per closed connection to stderr, with HAProxy's tcplog fields (client, accept date, frontend, backend/server, Tw/Tc/Tt, bytes, termination state, retries). Per service: \"log_connections\" in its _config.", "BERTH_LOG_CONNECTIONS"))
    var logConnections = false

    @Option(help: EnvironmentFlags.help("Connection log lines: plain (HAProxy's tcplog) or json (one object per line).", "BERTH_LOG_FORMAT"))
    var logFormat: ConnectionLogFormat = .plain

    /// Records each worker holds for the log writer before dropping (tests make it tiny).
    @Option(help: .hidden)
    var logRing = 4_096

    /// How often the log writer drains (ms).
    @Option(help: .hidden)
    var logFlushInterval: Int = 50

    func validate() throws {
        if logRing < 2 || logRing > 1 << 20 { throw invalid("--log-ring", "\(logRing)", "a number from 2 to 1048576") }
        if logFlushInterval < 1 || logFlushInterval > 60_000 { throw invalid("--log-flush-interval", "\(logFlushInterval)", "milliseconds from 1 to 60000") }
        if let workers, workers < 1 || workers > 256 { throw invalid("--workers", "\(workers)", "a number from 1 to 256") }
        if retries < 0 || retries > 100 { throw invalid("--retries", "\(retries)", "a number from 0 to 100") }
        if let maxconn, maxconn < 1 { throw invalid("--maxconn", "\(maxconn)", "a positive number") }
        if pipeSize < 0 || pipeSize > Int(Int32.max) { throw invalid("--pipe-size", "\(pipeSize)", "a size in bytes up to 2147483647, 0 for the default") }
        if let cpus, parsedCPUs(cpus) == nil { throw invalid("--cpus", cpus, "CPU numbers separated by commas") }
        if connectTimeout.milliseconds < 1 { throw invalid("--connect-timeout", "\(connectTimeout)", "a positive duration") }
        if firstByteTimeout.milliseconds < 1 { throw invalid("--first-byte-timeout", "\(firstByteTimeout)", "a positive duration") }
    }

    private func parsedCPUs(_ text: String) -> [Int]? {
        let values = text.split(separator: ",").map { Int($0.trimmingCharacters(in: " ")) }
        guard !values.isEmpty, values.allSatisfy({ $0 != nil && $0! >= 0 }) else { return nil }
        return values.map { $0! }
    }

    /// `logAvailable`: the commands whose services may turn the log on in their `_config`
    /// (discovery) get a connection log even without `--log-connections`.
    func engineConfiguration(observeErrors: Int, logAvailable: Bool = false) -> EngineConfiguration {
        var configuration = EngineConfiguration()
        if logConnections || logAvailable {
            var log = ConnectionLogSettings(format: logFormat)
            log.ringCapacity = logRing
            log.flushInterval = Int64(logFlushInterval)
            configuration.connectionLog = log
        }
        configuration.workers = workers ?? availableCPUCount()
        configuration.relay = relay
        configuration.drainTimeout = drainTimeout.milliseconds
        configuration.pipeSize = pipeSize
        if let maxconn { configuration.maxConnections = maxconn }
        if let cpus { configuration.cpus = parsedCPUs(cpus) ?? [] }
        configuration.observeErrors = observeErrors
        return configuration
    }

    var frontendSettings: FrontendSettings {
        var settings = FrontendSettings(
            retries: retries, connectTimeout: connectTimeout.milliseconds,
            clientTimeout: clientTimeout.milliseconds, serverTimeout: serverTimeout.milliseconds,
            retryOnEmptyResponse: retryOn.emptyResponse, retryOnResponseTimeout: retryOn.responseTimeout,
            firstByteTimeout: firstByteTimeout.milliseconds)
        settings.logConnections = logConnections
        settings.sendProxy = sendProxy.version
        settings.balance = balance
        settings.slowStart = slowStart.milliseconds
        return settings
    }

    func summary(_ configuration: EngineConfiguration) -> String {
        "\(configuration.workers) worker(s), relay \(relay.rawValue), maxconn \(configuration.maxConnections)"
    }

    /// Blocks until SIGTERM or SIGINT, then stops accepting and drains for up to
    /// --drain-timeout; a second signal ends the drain at once. The caller blocked both
    /// signals first (`ProcessSignals.block`), so no other thread takes them.
    ///
    /// After a takeover the first SIGTERM is the process's own (`taken` is set): the operator's
    /// `docker stop` of the old container that follows is then the first signal from outside,
    /// and the drain goes on; only a further one ends it at once.
    func waitForSignalThenDrain(_ router: HealthRouter, taken: TakenOver? = nil, beforeDrain: () -> Void = {}, afterDrain: () -> Void = {}) {
        let signal = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        let takenOver = taken?.isSet == true
        log("signal \(signal): stopping; draining \(router.engine.openConnections) connection(s) for up to \(drainTimeout)")
        _ = OSThread(name: "berth-signals") {
            var tolerated = takenOver ? 1 : 0
            while true {
                let next = ProcessSignals.wait(for: [SIGTERM, SIGINT])
                if tolerated > 0 {
                    tolerated -= 1
                    log("signal \(next): already draining after the takeover; a further signal ends the drain at once")
                    continue
                }
                log("second signal: exiting without waiting")
                _exit(1)
            }
        }
        beforeDrain()
        router.shutdown(drainTimeout: drainTimeout.milliseconds)
        afterDrain()
        log("stopped")
    }
}

/// `--send-proxy`: the PROXY protocol version written to backends, or none.
enum SendProxyArgument: String, ExpressibleByArgument, CaseIterable {
    case none, v1, v2

    var version: ProxyProtocolVersion? { ProxyProtocolVersion(rawValue: rawValue) }
}
