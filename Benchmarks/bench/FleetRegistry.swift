import BerthEtcd
import BerthSystem
import Glibc
import Synchronization

/// The fleet's registry, kept by the hosts themselves as a real fleet keeps it: every host runs
/// `berth register --no-docker --static-file F` next to its `berth discover`, under a lease of
/// its own, and registers its share of the instances (instance `item` of the registry lives on
/// host `item % hosts`, as `service<S>=<host address>:<1000 + I>@<20000 + S>`). A change of the
/// churn is a line added to or removed from one host's file, then SIGHUP to that host's
/// registrar, which puts or deletes the key under its lease; the revision each change got is
/// read from a watch of the registry (`RevisionWatch`).
final class FleetRegistrars {
    let network: FleetNetwork
    let hosts: Int
    let services: Int
    let endpoint: String
    let directory: String
    let berth: String
    let cpus: String
    private(set) var processes: [ChildProcess] = []
    /// Items (service × 10 + instance) registered now, per host.
    private var present: [Set<Int>]

    init(network: FleetNetwork, hosts: Int, services: Int, endpoint: String, directory: String, berth: String, cpus: String) {
        self.network = network
        self.hosts = hosts
        self.services = services
        self.endpoint = endpoint
        self.directory = directory
        self.berth = berth
        self.cpus = cpus
        present = (0..<hosts).map { host in Set(stride(from: host, to: services * FleetScenario.instancesPerService, by: hosts)) }
    }

    var items: Int { services * FleetScenario.instancesPerService }

    func host(of item: Int) -> Int { item % hosts }

    func key(of item: Int) -> String {
        let service = item / FleetScenario.instancesPerService, instance = item % FleetScenario.instancesPerService
        return "\(FleetScenario.prefix)/service\(service)/\(network.address(of: "h\(host(of: item))")):\(1_000 + instance)"
    }

    private func line(_ item: Int) -> String {
        let service = item / FleetScenario.instancesPerService, instance = item % FleetScenario.instancesPerService
        return "service\(service)=\(network.address(of: "h\(host(of: item))")):\(1_000 + instance)@\(FleetScenario.firstPort + service)"
    }

    private func file(_ host: Int) -> String { "\(directory)/host\(host).static" }

    /// Writes every host's file and starts its registrar.
    func start() throws(BenchError) {
        for host in 0..<hosts {
            try write(host)
            let (path, arguments) = network.command(as: "h\(host)", berth, [
                "register", "--etcd", endpoint, "--prefix", FleetScenario.prefix, "--no-docker",
                "--static-file", file(host), "--ttl", "\(FleetScenario.leaseSeconds)s", "--log-level", "notice",
            ])
            processes.append(try Launcher.spawnOnCPUs(name: "registrar\(host)", path: path, arguments: arguments, cpus: cpus,
                                                      logFile: "\(directory)/host\(host).register.log"))
        }
    }

    /// Adds or removes `item` on its host and signals that host's registrar; true for an add.
    func toggle(_ item: Int) throws(BenchError) -> Bool {
        let host = host(of: item)
        let added = present[host].remove(item) == nil
        if added { present[host].insert(item) }
        try write(host)
        kill(processes[host].pid, SIGHUP)
        return added
    }

    /// The file, written whole to a temporary name and renamed over the old one: a registrar
    /// reading it never sees half of it.
    private func write(_ host: Int) throws(BenchError) {
        let text = present[host].sorted().map { line($0) + "\n" }.joined()
        let temporary = file(host) + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .child("cannot write \(temporary): errno \(errno)") }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        guard written == bytes.count, rename(temporary, file(host)) == 0 else { throw .child("cannot write \(file(host)): errno \(errno)") }
    }

    /// SIGTERM to all first (each revokes its lease), then each reaped.
    func stopAll() {
        for process in processes where !process.hasExited() { kill(process.pid, SIGTERM) }
        for process in processes { process.stop() }
        processes = []
    }
}

/// Every put and delete under the registry, in order, per key, from a watch the bench holds on
/// etcd: the revision a registrar's change got. A watch that ends (etcd too slow to answer its
/// progress requests, a broken stream the client gave up on) is opened again from the revision
/// after the last one seen, and said.
final class RevisionWatch: Sendable {
    private final class Events: Sendable {
        let table = Mutex<[String: [Int64]]>([:])
        let next = Atomic<Int64>(0)
    }

    private let events = Events()
    private let task: Task<Void, Never>

    init(client: EtcdClient, fromRevision revision: Int64) {
        let events = self.events
        events.next.store(revision, ordering: .relaxed)
        task = Task {
            while !Task.isCancelled {
                do {
                    try await client.watch(prefix: FleetScenario.prefix + "/", fromRevision: events.next.load(ordering: .relaxed)) { batch in
                        events.table.withLock { table in
                            for event in batch.events { table[event.keyValue.key, default: []].append(event.keyValue.modRevision) }
                        }
                        events.next.store(batch.revision + 1, ordering: .relaxed)
                    }
                } catch {
                    if Task.isCancelled { return }
                    progress("fleet: the bench's watch ended (\(error)); watching again from revision \(events.next.load(ordering: .relaxed))")
                    try? await Task.sleep(for: .milliseconds(200))
                }
            }
        }
    }

    /// The revisions of `key`'s changes seen so far, oldest first.
    func revisions(of key: String) -> [Int64] { events.table.withLock { $0[key] ?? [] } }

    func stop() { task.cancel() }
}
