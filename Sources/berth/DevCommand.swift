import ArgumentParser
import BerthSystem
import BerthEtcd
import BerthHealth
import BerthRegistrar
import BerthStats
import BerthWhoami
import Glibc

/// `berth dev`: the whole system on loopback for a first look.
struct DevCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dev",
        abstract: "Run everything on loopback for a first look: etcd, whoami backends, registration, the proxy.",
        discussion: """
            Starts Debian's etcd as a child (temporary data directory, free ports), --backends \
            whoami servers on 127.0.0.1, registers them statically as the service "whoami" with \
            listen port --port, and runs discovery and the proxy on 127.0.0.1. Prints what to try. \
            Ctrl-C (or SIGTERM) revokes the registration, drains, stops etcd and removes its data: \
            nothing is left behind.
            """)

    @Option(help: "Port of the whoami service on 127.0.0.1.")
    var port: UInt16 = 8000

    @Option(help: "How many whoami backends to start (1 to 9).")
    var backends: Int = 3

    @Option(help: "The etcd executable to start.")
    var etcdBinary: String = "/usr/bin/etcd"

    static let environment = EnvironmentFlags(command: "dev", flags: LoggingOptions.environment)

    @Option(help: "Address of the stats page, or off (default: 127.0.0.1:1936, or a free port when 1936 is taken).")
    var stats: String?

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    func validate() throws {
        if port == 0 { throw invalid("--port", "0", "a port from 1 to 65535") }
        if !(1...9).contains(backends) { throw invalid("--backends", "\(backends)", "a number from 1 to 9") }
    }

    func run() throws {
        ProcessSignals.block([SIGTERM, SIGINT])
        let etcd = try DevEtcd(binary: etcdBinary)
        var servers: [WhoamiServer] = []
        var running: DiscoveryRuntime?
        var registering: RegistrarTask?
        var server: StatsServer?
        defer {
            registering?.stop(within: 3)
            running?.stop()
            running?.router.shutdown(drainTimeout: 1_000)
            server?.stop()
            for server in servers { server.stop() }
            etcd.stop()
            log("dev: stopped everything; removed \(etcd.directory)")
        }
        for index in 1...backends {
            servers.append(try WhoamiServer(listen: try SocketAddress(parsing: "127.0.0.1:0"), identity: "whoami-\(index)"))
        }
        let statics = servers.map { "whoami=127.0.0.1:\($0.address.port)@\(port)" }
        let etcdOptions = try EtcdOptions.parse(["--etcd", etcd.clientURL])
        running = try DiscoveryRuntime.start(
            etcd: etcdOptions, discovery: try DiscoveryOptions.parse(["--bind", "127.0.0.1", "--linger", "2s"]),
            proxy: try ProxyOptions.parse(["--workers", "2", "--drain-timeout", "1s"]),
            health: try HealthOptions.parse(["--check", "http:/", "--check-interval", "1s", "--rise", "2", "--fall", "2"]))
        let registration = try RegistrationOptions.parse(statics.flatMap { ["--static", $0] } + ["--no-docker", "--ttl", "5s"])
        let registrar = try registration.makeRegistrar(client: running!.client, prefix: etcdOptions.prefix)
        // The default port may be taken (another Berth, a second `berth dev`): then any free one.
        let statsAddress = stats ?? (Self.canBind(port: 1936) ? "127.0.0.1:1936" : "127.0.0.1:0")
        server = try running!.startStats(try StatsOptions.parse(["--stats", statsAddress]), registrar: registrar)
        let statsShown = server?.boundAddress.map { "http://\($0)/  (also /;csv, /stats.json, /metrics)" } ?? "off"
        registering = RegistrarTask(registrar)
        guard waitForListener(port: port, seconds: 10) else {
            throw ValidationErrorText("the whoami service did not open 127.0.0.1:\(port) within 10 s (port in use?)")
        }
        let banner = """
            berth dev: ready
              etcd        \(etcd.clientURL) (data in \(etcd.directory))
              backends    \(servers.map { "\($0.identity) on \($0.address)" }.joined(separator: ", "))
              service     whoami on 127.0.0.1:\(port), round-robin, HTTP checks every 1s
              stats       \(statsShown)
            try:
              curl http://127.0.0.1:\(port)/          (again and again: the answers rotate)
              etcdctl --endpoints \(etcd.clientURL) get --prefix /backends
            Ctrl-C stops everything.

            """
        // Written at once (not through print's buffer): scripts wait for "ready".
        banner.withCString { _ = Glibc.write(1, $0, strlen($0)) }
        let signal = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        log("dev: signal \(signal): stopping")
    }

    /// Polls until something accepts on 127.0.0.1:`port`.
    private func waitForListener(port: UInt16, seconds: Double) -> Bool {
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while MonotonicClock.nanoseconds() < deadline {
            if let address = try? SocketAddress(parsing: "127.0.0.1:\(port)"), Self.accepts(address) { return true }
            usleep(20_000)
        }
        return false
    }

    /// Whether a listener could bind 127.0.0.1:`port` now.
    private static func canBind(port: UInt16) -> Bool {
        guard let address = try? SocketAddress(parsing: "127.0.0.1:\(port)"),
              var socket = try? Sockets.listen(on: address, reusePort: false) else { return false }
        socket.close()
        return true
    }

    private static func accepts(_ address: SocketAddress) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var raw = sockaddr_in()
        raw.sin_family = sa_family_t(AF_INET)
        raw.sin_port = address.port.bigEndian
        inet_pton(AF_INET, "127.0.0.1", &raw.sin_addr)
        return withUnsafePointer(to: &raw) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }
}
