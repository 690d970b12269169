import ArgumentParser
import BerthEngine
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
            client: this host's containers (and --static and --static-file services) are kept \
            in etcd under one lease, and every service in the registry is balanced on --bind at \
            its listen port. SIGTERM revokes the lease first (every key of this host goes at once, so other hosts \
            stop sending new connections here), then drains open connections. With \
            --takeover-socket, a new `berth run` takes over the listening sockets and the lease \
            instead: nothing is revoked, and the old process drains and exits. SIGHUP reads \
            --static-file again, as `berth register --help` says (a bad file is logged and the \
            previous entries stay); without --static-file it is logged and ignored.
            """)

    static let environment = EnvironmentFlags(
        command: "run",
        flags: EtcdOptions.environment + RegistrationOptions.environment + DiscoveryOptions.environment
            + ProxyOptions.environment + HealthOptions.environment + StatsOptions.environment + LoggingOptions.environment
            + TakeoverOptions.environment,
        switches: RegistrationOptions.switches + ProxyOptions.switches)

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

    @OptionGroup(title: "Restarts")
    var takeover: TakeoverOptions

    func run() throws {
        ProcessSignals.block([SIGTERM, SIGINT, SIGHUP])
        let incoming = takeover.request()
        let running = try DiscoveryRuntime.start(etcd: etcd, discovery: discovery, proxy: proxy, health: health,
                                                 prepare: { takeover.adopt(incoming, into: $0.engine) })
        let registrar: Registrar
        do {
            registrar = try registration.makeRegistrar(client: running.client, prefix: etcd.prefix,
                                                       adoptedLease: incoming?.offer.leaseID)
        } catch {
            running.stop()
            running.router.shutdown(drainTimeout: 0)
            throw error
        }
        takeover.complete(incoming, engine: running.router.engine, ready: { running.router.engine.statistics().revision > 0 })
        let server = try running.startStats(stats, registrar: registrar, reusePort: takeover.enabled)
        // Registration starts once the previous process has let go (it stops its own without
        // revoking): the lease it handed over is kept alive from here.
        let registering = RegistrarTask(registrar)
        registration.reloadOnHangup(registrar)
        log("registering this host's \(registration.usesDocker ? "containers" : "static services") under \(etcd.prefix), TTL \(registration.ttl)")
        let taken = TakenOver()
        let takeoverServer = try running.serveTakeover(takeover, taken: taken, leaseID: { registrar.status.leaseID })
        proxy.waitForSignalThenDrain(running.router, taken: taken, beforeDrain: {
            takeoverServer?.stop()
            registering.stop(within: 4, revokingLease: !taken.isSet)
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

    /// Asks the registrar to stop, revoking its lease unless a successor took it over; cancels
    /// it after `seconds`.
    func stop(within seconds: Double, revokingLease: Bool = true) {
        registrar.shutdown(revokingLease: revokingLease)
        let deadline = MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
        while !finished.value.load(ordering: .acquiring) && MonotonicClock.nanoseconds() < deadline { usleep(5_000) }
        if !finished.value.load(ordering: .acquiring) { task.cancel() }
    }
}
