import BerthSystem
import BerthEtcd
import Dispatch
import Glibc
import Synchronization

/// The discovery scenario: `berth discover` on a real etcd (`/usr/bin/etcd`, one member, its
/// data in a temporary directory, on the load CPU with the backends), the proxy pinned to the
/// proxy CPU with one worker, as in the other scenarios.
///
/// - Propagation: one service, one instance key, re-put `puts` times, pointing at web0 and web1
///   in turn. The clock starts just before each put; after etcd's acknowledgement the bench
///   opens a connection through the service's port and sends `GET /`, again and again, until
///   the answer comes from the instance's new backend (at most `routeTimeout`; a timeout is
///   counted). The put's own latency (call to acknowledgement) is recorded beside it.
/// - Initial sync: `services` services of `instancesPerService` instances each, written with
///   `EtcdClient.putAll` before a fresh `berth discover` starts, each service on a port of its
///   own: the time from spawning it until every service port accepts a connection, its RSS
///   then, and the RSS of one whose registry prefix is empty.
///
/// Each part uses a registry prefix of its own, so that neither sees the other's keys.
struct DiscoveryScenario {
    static let etcdPath = "/usr/bin/etcd"
    static let propagationPrefix = "/bench-propagation"
    static let syncPrefix = "/bench-sync"
    static let emptyPrefix = "/bench-empty"
    static let serviceName = "web"
    static let instanceName = "i0"
    /// How long one put may take to become routable before it counts as a timeout (ms).
    static let routeTimeout: Int64 = 2_000
    /// Per step (connect, send, each read) of one request through the service (ms).
    static let probeStepTimeout: CInt = 500
    /// Requests through the service per put, at most (the time bound comes first on loopback).
    static let probeLimit = 100_000
    /// The issue's target for the propagation's p99 (ms); reported, never asserted.
    static let targetP99Milliseconds = 10.0
    static let instancesPerService = 10
    /// Keys per transaction (etcd's default --max-txn-ops).
    static let keysPerTransaction = 128
    /// How long the sync may take until every port accepts (ms).
    static let syncTimeout: Int64 = 120_000
    /// How long the empty-registry baseline may take to report its watch (ms).
    static let baselineTimeout: Int64 = 10_000
    /// How long one etcd call from the bench may take (s); the client's own timeout is 5 s.
    static let etcdCallTimeout = 30.0

    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int
    /// The run's two whoami backends, whose answers name them differently.
    let web: [SocketAddress]
    let berth: String

    var puts: Int { options.quick ? 100 : 1_000 }
    var services: Int { options.quick ? 100 : 1_000 }

    func run() -> DiscoveryResult {
        var result = DiscoveryResult(puts: puts, services: services, instancesPerService: Self.instancesPerService)
        guard access(Self.etcdPath, X_OK) == 0 else {
            result.skipped = "\(Self.etcdPath) is missing (apt-get install etcd-server)"
            progress("discovery skipped: \(result.skipped!)")
            return result
        }
        let names: [String]
        let etcd: ServingProcess
        let client: EtcdClient
        let endpoint: String
        do throws(BenchError) {
            names = try backendNames()
            (etcd, client, endpoint) = try startEtcd()
        } catch {
            result.skipped = "\(error)"
            progress("discovery skipped: \(error)")
            return result
        }
        defer {
            client.close()
            etcd.stop()
        }
        do throws(BenchError) {
            result.propagation = try measurePropagation(client: client, endpoint: endpoint, names: names)
        } catch {
            result.failures.append("propagation: \(error)")
            progress("discovery, propagation: failed: \(error)")
        }
        do throws(BenchError) {
            result.sync = try measureSync(client: client, endpoint: endpoint)
        } catch {
            result.failures.append("initial sync: \(error)")
            progress("discovery, initial sync: failed: \(error)")
        }
        if etcd.child.hasExited() { result.failures.append("etcd exited during the scenario") }
        return result
    }

    // MARK: Processes

    /// The names in the two web backends' answers, asked directly: they must differ, since the
    /// propagation tells the backends apart by them.
    private func backendNames() throws(BenchError) -> [String] {
        let names = web.prefix(2).map { address in Launcher.fetch(from: address, stepTimeout: Self.probeStepTimeout).flatMap(Launcher.whoamiName) }
        guard names.count == 2, let first = names[0], let second = names[1], first != second else {
            throw .child("the web backends must answer with two different whoami names (got \(names.map { $0 ?? "no answer" }))")
        }
        return [first, second]
    }

    /// etcd on free loopback ports, on the load CPU, its data and log in a temporary directory
    /// (removed when it stops); a client once it answers, and its URL.
    private func startEtcd() throws(BenchError) -> (ServingProcess, EtcdClient, String) {
        let directory = try TemporaryDirectory(prefix: "berth-bench-etcd")
        let etcd: ServingProcess
        do throws(BenchError) {
            let client = SocketAddress(ipv4: (127, 0, 0, 1), port: try Launcher.freePort())
            let peer = "http://127.0.0.1:\(try Launcher.freePort())"
            etcd = try Launcher.startExternal(name: "etcd", path: Self.etcdPath, arguments: [
                "--name", "bench", "--data-dir", "\(directory.path)/data",
                "--listen-client-urls", "http://\(client)", "--advertise-client-urls", "http://\(client)",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "bench=\(peer)", "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn",
            ], cpus: "\(loadCPU)", directory: directory, addresses: ["etcd": client])
        } catch {
            directory.remove()
            throw error
        }
        do throws(BenchError) {
            let address = try etcd.address("etcd")
            let client: EtcdClient
            do {
                client = try EtcdClient(configuration: EtcdConfiguration(endpoints: [EtcdEndpoint(host: "127.0.0.1", port: Int(address.port))]))
            } catch {
                throw BenchError.child("etcd client: \(error)")
            }
            // The client port accepts before the member has elected itself; the client retries.
            _ = try Self.etcdCall("the first request") { try await client.get(key: Self.propagationPrefix) }
            return (etcd, client, "http://\(address)")
        } catch {
            etcd.stop()
            throw error
        }
    }

    /// `berth discover` on `prefix`, one worker on the proxy CPU, services on 127.0.0.1, a
    /// service with no instance closed at once; ready once `addresses` accept. Its stderr (the
    /// log) in `log`.
    private func startDiscover(endpoint: String, prefix: String,
                               addresses: [String: SocketAddress] = [:]) throws(BenchError) -> (process: ServingProcess, log: String) {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let process = try Launcher.startExternal(name: "discover", path: berth, arguments: [
                "discover", "--etcd", endpoint, "--prefix", prefix, "--bind", "127.0.0.1", "--workers", "1",
                "--cpus", "\(proxyCPU)", "--linger", "0", "--drain-timeout", "1s",
            ], cpus: "\(proxyCPU)", directory: directory, addresses: addresses)
            return (process, "\(directory.path)/discover.log")
        } catch {
            directory.remove()
            throw error
        }
    }

    /// The registry value of an instance at `backend` for a service listening on `listen`.
    static func instanceValue(_ backend: SocketAddress, listen: UInt16) -> [UInt8] {
        Array("{\"host\":\"127.0.0.1\",\"port\":\(backend.port),\"listen\":\(listen)}".utf8)
    }

    // MARK: Propagation

    private func measurePropagation(client: EtcdClient, endpoint: String, names: [String]) throws(BenchError) -> Propagation {
        let listen = SocketAddress(ipv4: (127, 0, 0, 1), port: try Launcher.freePort())
        let key = "\(Self.propagationPrefix)/\(Self.serviceName)/\(Self.instanceName)"
        let first = Self.instanceValue(web[0], listen: listen.port)
        _ = try Self.etcdCall("put") { try await client.put(key: key, value: first) }
        let discover = try startDiscover(endpoint: endpoint, prefix: Self.propagationPrefix, addresses: [Self.serviceName: listen]).process
        defer { discover.stop() }
        let started = MonotonicClock.nanoseconds()
        guard awaitRoute(to: names[0], through: listen, deadline: started + UInt64(Launcher.startTimeout) * 1_000_000).routed != nil else {
            throw .child("no answer from \(names[0]) through \(listen) within \(Launcher.startTimeout) ms")
        }
        progress("discovery, propagation: berth discover pid \(discover.pid) on CPU \(proxyCPU), \(puts) puts")
        var figures = Propagation()
        var current = 0
        for _ in 0..<puts {
            let next = 1 - current
            let value = Self.instanceValue(web[next], listen: listen.port)
            let start = MonotonicClock.nanoseconds()
            _ = try Self.etcdCall("put") { try await client.put(key: key, value: value) }
            figures.putNanoseconds.append(MonotonicClock.nanoseconds() - start)
            let wait = awaitRoute(to: names[next], through: listen, deadline: start + UInt64(Self.routeTimeout) * 1_000_000)
            figures.staleAnswers += wait.stale
            current = next
            if let routed = wait.routed {
                figures.routeNanoseconds.append(routed - start)
                continue
            }
            figures.timeouts += 1
            // Known state again before the next put, or give up.
            let settle = MonotonicClock.nanoseconds() + UInt64(Launcher.startTimeout) * 1_000_000
            guard awaitRoute(to: names[next], through: listen, deadline: settle).routed != nil else {
                throw .child("\(names[next]) never answered through \(listen) after a put (\(figures.routeNanoseconds.count) puts routed)")
            }
        }
        if discover.child.hasExited() { throw .child("berth discover exited during the propagation") }
        progress("discovery, propagation: p50 \(Format.fixed(figures.routeMilliseconds(50) ?? 0, 2)) ms, p99 "
            + "\(Format.fixed(figures.routeMilliseconds(99) ?? 0, 2)) ms, \(figures.timeouts) timeouts")
        return figures
    }

    /// Sends `GET /` through `address`, one connection after the other, until `name` answers
    /// or `deadline` (monotonic ns) passes: when it answered (nil: never), and how many answers
    /// came from another backend before it.
    private func awaitRoute(to name: String, through address: SocketAddress, deadline: UInt64) -> (routed: UInt64?, stale: Int) {
        var stale = 0
        for _ in 0..<Self.probeLimit {
            guard MonotonicClock.nanoseconds() < deadline else { break }
            guard let response = Launcher.fetch(from: address, stepTimeout: Self.probeStepTimeout),
                  let answered = Launcher.whoamiName(response) else { continue }
            if answered == name { return (MonotonicClock.nanoseconds(), stale) }
            stale += 1
        }
        return (nil, stale)
    }

    // MARK: Initial sync

    private func measureSync(client: EtcdClient, endpoint: String) throws(BenchError) -> SyncFigures {
        var figures = SyncFigures()
        let empty = try startDiscover(endpoint: endpoint, prefix: Self.emptyPrefix)
        figures.emptyResidentBytes = awaitWatch(empty.process, log: empty.log)
        empty.process.stop()

        let ports = try Self.distinctFreePorts(services)
        var pairs: [(key: String, value: [UInt8])] = []
        for (service, port) in ports.enumerated() {
            for instance in 0..<Self.instancesPerService {
                pairs.append((key: "\(Self.syncPrefix)/service\(service)/instance\(instance)",
                              value: Self.instanceValue(web[instance % web.count], listen: port)))
            }
        }
        let writeStart = MonotonicClock.nanoseconds()
        for offset in stride(from: 0, to: pairs.count, by: Self.keysPerTransaction) {
            let batch = Array(pairs[offset..<min(offset + Self.keysPerTransaction, pairs.count)])
            _ = try Self.etcdCall("putAll") { try await client.putAll(batch) }
            figures.transactions += 1
        }
        figures.writeSeconds = Double(MonotonicClock.nanoseconds() - writeStart) / 1e9
        progress("discovery, initial sync: \(Format.grouped(UInt64(pairs.count))) keys written in \(figures.transactions) "
            + "transactions (\(Format.fixed(figures.writeSeconds, 2)) s); starting berth discover")

        let spawned = MonotonicClock.nanoseconds()
        let discover = try startDiscover(endpoint: endpoint, prefix: Self.syncPrefix).process
        defer { discover.stop() }
        let deadline = spawned + UInt64(Self.syncTimeout) * 1_000_000
        var accepting = 0
        // Port by port: one that accepts is not asked again.
        while accepting < ports.count && MonotonicClock.nanoseconds() < deadline {
            if Launcher.canConnect(to: SocketAddress(ipv4: (127, 0, 0, 1), port: ports[accepting])) {
                if accepting == 0 { figures.firstPortMilliseconds = Double(MonotonicClock.nanoseconds() - spawned) / 1e6 }
                accepting += 1
            } else if discover.child.hasExited() {
                throw .child("berth discover exited before its services listened")
            } else {
                usleep(1_000)
            }
        }
        guard accepting == ports.count else {
            throw .child("\(accepting) of \(ports.count) service ports accepted within \(Self.syncTimeout) ms")
        }
        figures.allPortsMilliseconds = Double(MonotonicClock.nanoseconds() - spawned) / 1e6
        figures.residentBytes = ProcFS.residentBytes(of: discover.pid)
        progress("discovery, initial sync: \(ports.count) services accepting \(Format.fixed(figures.allPortsMilliseconds ?? 0, 0)) ms "
            + "after spawning, RSS \(figures.residentBytes.map { Format.fixed(Double($0) / 1_048_576, 1) } ?? "-") MiB")
        return figures
    }

    /// Waits until `process` logs that it watches the registry (its listing applied), then its
    /// RSS; nil if it never says so within `baselineTimeout`.
    private func awaitWatch(_ process: ServingProcess, log: String) -> UInt64? {
        let deadline = MonotonicClock.milliseconds() + Self.baselineTimeout
        while MonotonicClock.milliseconds() < deadline {
            if ProcFS.read(log)?.contains("watching the registry") == true {
                usleep(100_000)  // the first table applied by the workers
                return ProcFS.residentBytes(of: process.pid)
            }
            usleep(10_000)
        }
        return nil
    }

    /// `count` distinct ports of 127.0.0.1 that were free a moment ago: all bound at once (so
    /// none comes twice), then released.
    static func distinctFreePorts(_ count: Int) throws(BenchError) -> [UInt16] {
        var held: [CInt] = []
        defer { for fd in held { Glibc.close(fd) } }
        var ports: [UInt16] = []
        do {
            for _ in 0..<count {
                var socket = try Sockets.listen(on: SocketAddress(ipv4: (127, 0, 0, 1), port: 0), reusePort: false, backlog: 1)
                let port = try Sockets.localAddress(socket.raw).port
                held.append(socket.release())
                ports.append(port)
            }
        } catch {
            throw .system(error)
        }
        return ports
    }

    // MARK: etcd from synchronous code

    /// Runs `body` (an etcd call) in a task and waits for it on this thread (the bench's main
    /// thread, never one of the cooperative pool's), at most `etcdCallTimeout`.
    static func etcdCall<Value: Sendable>(_ what: String, _ body: @escaping @Sendable () async throws -> Value) throws(BenchError) -> Value {
        let call = PendingCall<Value>()
        Task {
            let result: Result<Value, any Error>
            do { result = .success(try await body()) } catch { result = .failure(error) }
            call.outcome.withLock { $0 = result }
            call.done.signal()
        }
        guard call.done.wait(timeout: .now() + etcdCallTimeout) == .success else {
            throw .child("etcd: \(what) took more than \(Int(etcdCallTimeout)) s")
        }
        switch call.outcome.withLock({ $0 }) {
        case .success(let value)?: return value
        case .failure(let error)?: throw .child("etcd: \(what): \(error)")
        case nil: throw .child("etcd: \(what): no outcome")
        }
    }
}

/// The outcome of one etcd call, handed from its task to the waiting thread.
private final class PendingCall<Value: Sendable>: Sendable {
    let outcome = Mutex<Result<Value, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
}
