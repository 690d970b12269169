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

            Static services (not containers) come from --static and from --static-file: a file of \
            NAME=HOST:PORT[@LISTEN] entries, one a line (blank lines and lines starting with # are \
            skipped; no entry may repeat another's service and instance, in the file or in \
            --static). A file that cannot be read or has a bad line stops the start with an error \
            naming the line. SIGHUP reads the file again: only what changed is written (puts for \
            new or changed entries, deletes for removed ones), under the same lease, and "static \
            services reloaded from PATH: N entries (+A, -D)" is logged; a file that cannot be read \
            or has a bad line is logged as an error and the previous entries stay registered. \
            Without --static-file, SIGHUP is logged and ignored.
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
        ProcessSignals.block([SIGTERM, SIGINT, SIGHUP])
        let client = try EtcdClient(configuration: etcd.configuration())
        let registrar = try registration.makeRegistrar(client: client, prefix: etcd.prefix)
        let registering = RegistrarTask(registrar)
        registration.reloadOnHangup(registrar)
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
        ("--compat", "BERTH_COMPAT"), ("--static", "BERTH_STATIC"), ("--static-file", "BERTH_STATIC_FILE"),
        ("--docker-host", "DOCKER_HOST"),
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

    @Option(help: EnvironmentFlags.help("A file of static services, NAME=HOST:PORT[@LISTEN] one a line (blank lines and # comments skipped), added to --static. SIGHUP reads it again and writes only the difference; a bad file then is logged and the previous entries stay.", "BERTH_STATIC_FILE"))
    var staticFile: String?

    @Option(help: EnvironmentFlags.help("Docker's API socket, unix:///path.", "DOCKER_HOST"))
    var dockerHost: String?

    @Flag(help: EnvironmentFlags.help("Register static services only; do not talk to Docker (automatic with --static or --static-file when there is no Docker socket).", "BERTH_NO_DOCKER"))
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
        _ = try fileRegistrations()
        if let dockerHost {
            do { _ = try DockerClient.socketPath(fromHost: dockerHost) } catch { throw invalid("--docker-host", dockerHost, "unix:///path/to/docker.sock") }
        }
    }

    /// The `--static` services; two with the same service and instance are refused.
    func staticRegistrations() throws -> [Registration] {
        var result: [Registration] = []
        for text in statics.flatMap({ $0.split(separator: ",") }).map({ String($0).trimmed }) {
            let registration: Registration
            do {
                registration = try StaticService(parsing: text).registration
            } catch {
                throw invalid("--static", text, "NAME=HOST:PORT[@LISTEN] (\(error))")
            }
            if result.contains(where: { $0.service == registration.service && $0.instance == registration.instance }) {
                throw invalid("--static", text, "service \(registration.service) instance \(registration.instance) is given twice")
            }
            result.append(registration)
        }
        return result
    }

    /// The `--static-file` services (none without the flag). A file that cannot be read, has a
    /// bad line, or repeats an entry of its own or of `--static` is a usage error naming the
    /// path and the line.
    func fileRegistrations() throws -> [Registration] {
        let flags = try staticRegistrations()
        guard let staticFile else { return [] }
        do {
            return try StaticServiceFile.load(path: staticFile, flags: flags)
        } catch {
            throw ValidationError("invalid --static-file \(error)")
        }
    }

    /// Docker is used unless `--no-docker`, or static services alone were asked for (`--static`
    /// or `--static-file`) and no Docker socket was named or exists at the default path.
    var usesDocker: Bool {
        if noDocker { return false }
        if (!statics.isEmpty || staticFile != nil) && dockerHost == nil {
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
        configuration.staticFile = staticFile
        configuration.fileStatics = try fileRegistrations()
        configuration.adoptedLease = adoptedLease
        if usesDocker {
            configuration.docker = try DockerClient(host: dockerHost ?? Self.defaultDockerSocket)
        }
        return Registrar(configuration: configuration, store: EtcdRegistrationStore(client: client))
    }
}

extension RegistrationOptions {
    /// SIGHUP, taken on a thread of its own for the life of the process: reads `--static-file`
    /// again (`Registrar.reloadStaticFile`), or is logged and ignored without one. The caller
    /// blocked SIGHUP before any thread was made (`ProcessSignals.block`), so it never ends the
    /// process and no other thread takes it.
    func reloadOnHangup(_ registrar: Registrar) {
        let hasFile = staticFile != nil
        _ = OSThread(name: "berth-sighup") {
            while ProcessSignals.wait(for: [SIGHUP]) == SIGHUP {
                if hasFile {
                    registrar.reloadStaticFile()
                } else {
                    log("SIGHUP: no --static-file to reload")
                }
            }
        }
    }
}

extension CompatMode: ExpressibleByArgument {}
