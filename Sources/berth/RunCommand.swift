import ArgumentParser
import BerthSystem
import BerthHealth
import BerthRegistrar
import BerthStats
import Glibc
import Synchronization

/// `berth run`: registration, discovery and the proxy in one process; the default command of
/// the `--net host` container.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Register this host's containers and proxy every service in etcd: registration, discovery and proxy in one process.",
        discussion: """
            What `berth register` and `berth discover` do, in one process sharing one etcd \
            client: this host's containers (and --static services) are kept in etcd under one \
            lease, and every service in the registry is balanced on --bind at its listen port. \
            SIGTERM revokes the lease first (every key of this host goes at once, so other hosts \
            stop sending new connections here), then drains open connections.
            """)

    static let environment = EnvironmentFlags(
        command: "run",
        flags: EtcdOptions.environment + RegistrationOptions.environment + DiscoveryOptions.environment
            + ProxyOptions.environment + HealthOptions.environment + StatsOptions.environment + LoggingOptions.environment,
        switches: RegistrationOptions.switches)

    @OptionGroup(title: "etcd")
    var etcd: EtcdOptions

    @OptionGroup(title: "Registration")
    var registration: RegistrationOptions

    @OptionGroup(title: "Discovery")
    var discovery: DiscoveryOptions

    @OptionGroup(title: "Proxying")
    var proxy: ProxyOptions

    @OptionGroup(title: "Health checks")
    var health: HealthOptions

    @OptionGroup(title: "Stats and admin")
    var stats: StatsOptions

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    func run() throws {
        ProcessSignals.block([SIGTERM, SIGINT])
        let running = try DiscoveryRuntime.start(etcd: etcd, discovery: discovery, proxy: proxy, health: health)
        let registrar: Registrar
        do {
            registrar = try registration.makeRegistrar(client: running.client, prefix: etcd.prefix)
        } catch {
            running.stop()
            running.router.shutdown(drainTimeout: 0)
            throw error
        }
        let server = try running.startStats(stats, registrar: registrar)
        let registering = RegistrarTask(registrar)
        log("registering this host's \(registration.usesDocker ? "containers" : "static services") under \(etcd.prefix), TTL \(registration.ttl)")
        proxy.waitForSignalThenDrain(running.router, beforeDrain: {
            registering.stop(within: 4)
            running.stop()
        }, afterDrain: { server?.stop() })
    }
}

/// The registrar running on a task; `stop` revokes its lease and waits (bounded) for the end.
final class RegistrarTask: Sendable {
    let registrar: Registrar
    private let finished = Flag()
    private let task: Task<Void, Never>

    final class Flag: Sendable {
        let value = Atomic<Bool>(false)
    }

    init(_ registrar: Registrar) {
        self.registrar = registrar
        let finished = self.finished
        task = Task {
            do {
                try await registrar.run()
            } catch {
                log("registrar: \(error)")
            }
            finished.value.store(true, ordering: .releasing)
        }
    }

    /// Asks the registrar to revoke its lease and stop; cancels it after `seconds`.
    func stop(within seconds: Double) {
        registrar.shutdown()
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while !finished.value.load(ordering: .acquiring) && MonotonicClock.nanoseconds() < deadline { usleep(5_000) }
        if !finished.value.load(ordering: .acquiring) { task.cancel() }
    }
}
