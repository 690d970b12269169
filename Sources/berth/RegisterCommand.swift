import ArgumentParser
import BerthSystem
import BerthEtcd
import BerthRegistrar
import Glibc
import Logging
import Synchronization

/// `berth register`: the registration side alone (the seed's docker-register).
struct RegisterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "register",
        abstract: "Register this host's Docker containers (and static services) into etcd under one lease.",
        discussion: """
            Every published TCP port of every running container is written to \
            <prefix>/<service>/<container-id-12>[-<port>] as Berth's JSON, under one lease per host \
            (kept alive every TTL/3): if this process dies, its keys expire within --ttl. Service \
            name: label berth.service (per port: berth.service.<port>), else registrator's \
            SERVICE_NAME / SERVICE_<port>_NAME, else the image name without tag; several ports give \
            <name>-<port>. Opt out with label berth.ignore=true or SERVICE_IGNORE. A stopped or killed \
            container is marked draining, then deleted when it dies. SIGTERM or SIGINT revokes the \
            lease (every key goes at once) and exits 0.
            """)

    static let environment = EnvironmentFlags(command: "register", flags: EtcdOptions.environment + RegistrationOptions.environment + LoggingOptions.environment,
                                              switches: RegistrationOptions.switches)

    @OptionGroup(title: "etcd")
    var etcd: EtcdOptions

    @OptionGroup(title: "Registration")
    var registration: RegistrationOptions

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    func run() throws {
        ProcessSignals.block([SIGTERM, SIGINT])
        let client = try EtcdClient(configuration: etcd.configuration())
        let registrar = try registration.makeRegistrar(client: client, prefix: etcd.prefix)
        let registering = RegistrarTask(registrar)
        log("registering into \(etcd.etcd) under \(etcd.prefix), TTL \(registration.ttl)")
        let signal = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        log("signal \(signal): revoking the lease")
        // Revoking takes one etcd round trip (bounded at 2 s inside); give it a little more.
        registering.stop(within: 4)
        client.close()
        log("stopped")
    }
}

/// The flags of the registration side, shared by `berth register` and `berth run`.
struct RegistrationOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [
        ("--host-ip", "HOST_IP"), ("--ttl", "BERTH_TTL"), ("--resync", "BERTH_RESYNC"),
        ("--compat", "BERTH_COMPAT"), ("--static", "BERTH_STATIC"), ("--docker-host", "DOCKER_HOST"),
    ]
    static let switches: [(flag: String, variable: String)] = [("--no-docker", "BERTH_NO_DOCKER")]

    @Option(help: EnvironmentFlags.help("Address registered for ports published on every address (0.0.0.0); a port bound to a specific address registers that address.", "HOST_IP"))
    var hostIP: String?

    @Option(help: EnvironmentFlags.help("Lease TTL: this host's keys expire this long after it dies (whole seconds, at least 2s; default 15s).", "BERTH_TTL"), transform: DurationArgument.parse)
    var ttl = DurationArgument(milliseconds: 15_000)

    @Option(help: EnvironmentFlags.help("How often the container table is rebuilt from Docker and checked against etcd (default 30s).", "BERTH_RESYNC"), transform: DurationArgument.parse)
    var resync = DurationArgument(milliseconds: 30_000)

    @Option(help: EnvironmentFlags.help("none, or seed: write the seed's HOST:PORT values and <service>/port keys for an old docker-discover.", "BERTH_COMPAT"))
    var compat: CompatMode = .none

    @Option(name: .customLong("static"), help: EnvironmentFlags.help("A service that is not a container, NAME=HOST:PORT[@LISTEN]; repeat the flag or separate with commas.", "BERTH_STATIC"))
    var statics: [String] = []

    @Option(help: EnvironmentFlags.help("Docker's API socket, unix:///path.", "DOCKER_HOST"))
    var dockerHost: String?

    @Flag(help: EnvironmentFlags.help("Register static services only; do not talk to Docker (automatic with --static when there is no Docker socket).", "BERTH_NO_DOCKER"))
    var noDocker = false

    static let defaultDockerSocket = "unix:///var/run/docker.sock"

    func validate() throws {
        if let hostIP, hostIP.isEmpty || hostIP.contains(where: { $0 == " " || $0 == "/" }) {
            throw invalid("--host-ip", hostIP, "an IP address")
        }
        if ttl.milliseconds < 2_000 || ttl.milliseconds % 1000 != 0 || ttl.milliseconds > 86_400_000 {
            throw invalid("--ttl", "\(ttl)", "whole seconds from 2s to 1d (a bare number is milliseconds: write 15s)")
        }
        if resync.milliseconds < 100 { throw invalid("--resync", "\(resync)", "a duration of at least 100ms") }
        _ = try staticRegistrations()
        if let dockerHost {
            do { _ = try DockerClient.socketPath(fromHost: dockerHost) } catch { throw invalid("--docker-host", dockerHost, "unix:///path/to/docker.sock") }
        }
    }

    func staticRegistrations() throws -> [Registration] {
        try statics.flatMap { $0.split(separator: ",") }.map { text in
            do {
                return try StaticService(parsing: String(text).trimmed).registration
            } catch {
                throw invalid("--static", String(text), "NAME=HOST:PORT[@LISTEN] (\(error))")
            }
        }
    }

    /// Docker is used unless `--no-docker`, or static services alone were asked for and no Docker
    /// socket was named or exists at the default path.
    var usesDocker: Bool {
        if noDocker { return false }
        if !statics.isEmpty && dockerHost == nil {
            return access(String(Self.defaultDockerSocket.dropFirst("unix://".count)), F_OK) == 0
        }
        return true
    }

    /// The registrar these flags describe, writing through `client` under `prefix`.
    /// `adoptedLease`: a lease handed over by the process this one took over.
    func makeRegistrar(client: EtcdClient, prefix: String, adoptedLease: Int64? = nil) throws -> Registrar {
        var configuration = RegistrarConfiguration(
            layout: RecordLayout(prefix: prefix, compat: compat), hostIP: hostIP,
            ttlSeconds: ttl.milliseconds / 1000, resyncInterval: .milliseconds(resync.milliseconds),
            statics: try staticRegistrations())
        configuration.adoptedLease = adoptedLease
        if usesDocker {
            configuration.docker = try DockerClient(host: dockerHost ?? Self.defaultDockerSocket)
        }
        return Registrar(configuration: configuration, store: EtcdRegistrationStore(client: client))
    }
}

extension CompatMode: ExpressibleByArgument {}
