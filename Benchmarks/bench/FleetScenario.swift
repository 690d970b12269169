import BerthEtcd
import BerthSystem
import Glibc

/// The fleet scenario: what every host watching etcd costs. `hosts` simulated hosts, each a
/// network namespace of its own on one bridge (`FleetNetwork`; loopback addresses where the
/// bed cannot be built, or with `--fleet-network loopback`) running a real `berth register`
/// (its share of the registry, static, under its own lease) and a real `berth discover` (one
/// worker, no stats server, its services on the host's address), all on one real etcd (one
/// member, data under /tmp) on a host of its own, first directly and then through etcd's gRPC
/// proxy (`etcd grpc-proxy start`, on a host of its own), in the same run. Every process
/// shares this machine's CPUs; none is pinned; etcd and the proxy run at nice −10 (a real fleet
/// gives them machines of their own).
///
/// - The registry: `services` services × 10 instances, put by the hosts' registrars
///   (`FleetRegistrars`) before the discovery processes start; the time until every host has
///   applied that listing.
/// - Churn: `changesPerSecond` removals and additions of random instances for `churnSeconds`,
///   each a line of one host's static file and a SIGHUP to that host's registrar. Each host
///   appends "REVISION MONOTONIC-NS" for every table it applies (`--revision-log`); a change is
///   routable on a host at its first line with a revision at least the change's (read from the
///   bench's own watch), measured from just before the signal. Reported: that time on every
///   host (the slowest host per change) and per host and change; etcd's CPU share over the
///   churn, its RSS, the bytes it sent per change (its `etcd_network_client_grpc_sent_bytes_total`)
///   and the lease keep-alives it took per second; the registrars' CPU and RSS.
/// - Half the hosts (the odd ones) watch only the services they use (`--services`): service0,
///   which every host uses, and a tenth of the others; their figures are reported apart, and
///   their routing counts only the changes of their services.
/// - An etcd restart (SIGTERM, then the same data and ports): the time from its new start
///   until every host has applied a put made as soon as it answers, and how many hosts listed
///   the registry again (and how spread out those listings were: a herd arrives together).
struct FleetScenario {
    static let prefix = "/fleet"
    static let instancesPerService = 10
    static let changesPerSecond = 50.0
    /// The issue's targets, reported, never asserted.
    static let targetP99Milliseconds = 50.0
    static let targetCatchUpSeconds = 5.0
    /// Listen ports of the services: 20000 onwards, on every host's own loopback address.
    static let firstPort = 20_000
    static let syncTimeout: Int64 = 300_000
    /// etcd and the proxy starting (again) while hundreds of processes share two cores.
    static let startTimeout: Int64 = 60_000
    static let catchUpTimeout: Int64 = 60_000
    /// Puts made while the hosts are stopped, before etcd compacts them away.
    static let herdChanges = 1_500
    /// The registrars' lease TTL (`berth register --ttl`, its default).
    static let leaseSeconds = 15

    enum Mode: String, CaseIterable {
        case direct
        case proxy = "grpc-proxy"
    }

    let options: BenchOptions
    let loadCPU: Int
    let berth: String

    var hosts: Int { options.fleetHosts ?? (options.quick ? 20 : 200) }
    var services: Int { options.fleetServices ?? (options.quick ? 100 : 1_000) }
    var churnSeconds: Double { options.quick ? 4 : 20 }
    /// Every process of the fleet may run on every CPU (`taskset -c`).
    var allCPUs: String { "0-\(max(1, loadCPU))" }
    /// On the network test bed, unless `--fleet-network loopback` or it cannot be built here.
    var onBed: Bool { options.fleetNetwork != "loopback" && FleetNetwork.bedUnavailable(hosts: hosts) == nil }

    func run() -> FleetResult {
        var result = FleetResult(hosts: hosts, services: services, churnSeconds: churnSeconds)
        guard access(DiscoveryScenario.etcdPath, X_OK) == 0 else {
            result.skipped = "\(DiscoveryScenario.etcdPath) is missing (apt-get install etcd-server)"
            progress("fleet skipped: \(result.skipped!)")
            return result
        }
        if options.fleetNetwork != "loopback", let reason = FleetNetwork.bedUnavailable(hosts: hosts) {
            guard options.fleetNetwork == nil else {
                result.failures.append("--fleet-network namespaces: \(reason)")
                return result
            }
            progress("fleet: on loopback addresses: the network test bed cannot be used (\(reason))")
        }
        // The bench measures and drives the churn: among hundreds of busy processes at nice 0
        // its own etcd calls timed out. Every thread of it (new ones inherit) at nice −10 for
        // the scenario, as etcd and the proxy are.
        Self.renice(-10)
        defer { Self.renice(0) }
        for mode in Mode.allCases where options.fleetModes?.contains(mode.rawValue) ?? true {
            do throws(BenchError) {
                result.rows.append(try measure(mode))
            } catch {
                result.failures.append("\(mode.rawValue): \(error)")
                progress("fleet, \(mode.rawValue): failed: \(error)")
            }
        }
        return result
    }

    /// Every thread of this process at `nice` (setpriority applies to one thread on Linux).
    private static func renice(_ nice: Int32) {
        for thread in ProcFS.threads(of: getpid()) {
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(thread.tid), nice)
        }
    }

    // MARK: One configuration

    private func measure(_ mode: Mode) throws(BenchError) -> FleetRow {
        var row = FleetRow(mode: mode.rawValue)
        let network = try FleetNetwork(hosts: hosts, namespaces: onBed)
        defer { network.remove() }
        row.network = network.name
        let data = try TemporaryDirectory(prefix: "berth-fleet-etcd")
        defer { data.remove() }
        let logs = try TemporaryDirectory(prefix: "berth-fleet-hosts")
        defer { logs.remove() }
        // Kept (`--fleet-logs`) whether the run completes or not; etcd's log goes with them.
        defer { if let kept = options.fleetLogs { Self.copyLogs(logs.path, to: "\(kept)/\(mode.rawValue)") } }
        let etcdLog = "\(logs.path)/etcd.log"
        var etcd: ServingProcess? = try startEtcd(data: data.path, network: network)
        defer { etcd?.stop(keepingLog: etcdLog) }
        let client: EtcdClient
        do {
            let bench = network.benchEndpoint
            client = try EtcdClient(configuration: EtcdConfiguration(endpoints: [EtcdEndpoint(host: bench.host, port: Int(bench.port))]))
        } catch {
            throw .child("etcd client: \(error)")
        }
        defer { client.close() }
        _ = try DiscoveryScenario.etcdCall("the first request") { try await client.get(key: Self.prefix) }

        var proxy: ServingProcess?
        defer { proxy?.stop() }
        var endpoint = "http://\(network.etcdAddress)"
        if mode == .proxy {
            proxy = try startProxy(network: network)
            endpoint = "http://\(network.proxyAddress)"
        }

        // The registry: every host's registrar, under its own lease.
        let registrars = FleetRegistrars(network: network, hosts: hosts, services: services, endpoint: endpoint,
                                         directory: logs.path, berth: berth, cpus: allCPUs)
        defer { registrars.stopAll() }
        let registering = MonotonicClock.nanoseconds()
        try registrars.start()
        let listed = try awaitRegistry(client, count: registrars.items, registrars: registrars)
        row.registerSeconds = Double(MonotonicClock.nanoseconds() - registering) / 1e9
        progress("fleet, \(mode.rawValue), \(network.name): \(hosts) registrars put \(registrars.items) instances in "
            + "\(Format.fixed(row.registerSeconds ?? 0, 1)) s")

        // The hosts.
        var fleet: [ChildProcess] = []
        defer { Self.stopAll(fleet) }
        let spawned = MonotonicClock.nanoseconds()
        for host in 0..<hosts {
            fleet.append(try spawnHost(host, endpoint: endpoint, logs: logs.path, network: network))
        }
        progress("fleet, \(mode.rawValue): \(hosts) hosts started; waiting for each to apply the listing (revision \(listed))")
        guard let synced = awaitRevision(listed, logs: logs.path, since: 0, fleet: fleet, timeout: Self.syncTimeout) else {
            throw .child("not every host applied the first listing within \(Self.syncTimeout / 1000) s")
        }
        row.syncSeconds = Double(synced - spawned) / 1e9
        let sizes = fleet.compactMap { ProcFS.residentBytes(of: $0.pid) }
        row.hostMeanResidentBytes = sizes.isEmpty ? nil : sizes.reduce(0, +) / UInt64(sizes.count)
        row.hostMaxResidentBytes = sizes.max()
        let registrarSizes = registrars.processes.compactMap { ProcFS.residentBytes(of: $0.pid) }
        row.registrarMeanResidentBytes = registrarSizes.isEmpty ? nil : registrarSizes.reduce(0, +) / UInt64(registrarSizes.count)

        // Churn.
        let metrics = { (prefix: String) in self.metric(network, prefix) }
        let etcdPID = etcd!.pid
        let cpuBefore = ProcFS.cpuTicks(of: etcdPID), proxyCPUBefore = proxy.flatMap { ProcFS.cpuTicks(of: $0.pid) }
        let bytesBefore = metrics(Self.sentBytesMetric), keepAlivesBefore = metrics(Self.keepAliveMetric)
        let hostsBefore = fleet.map { ProcFS.cpuTicks(of: $0.pid) ?? 0 }
        let registrarsBefore = registrars.processes.map { ProcFS.cpuTicks(of: $0.pid) ?? 0 }
        let churnStart = MonotonicClock.nanoseconds()
        let sent = try churn(registrars)
        let churnEnd = MonotonicClock.nanoseconds()
        let seconds = Double(churnEnd - churnStart) / 1e9
        if let before = cpuBefore, let after = ProcFS.cpuTicks(of: etcdPID) {
            row.etcdCPUShare = Double(after - before) / ProcFS.ticksPerSecond / seconds
        }
        if let proxy, let before = proxyCPUBefore, let after = ProcFS.cpuTicks(of: proxy.pid) {
            row.proxyCPUShare = Double(after - before) / ProcFS.ticksPerSecond / seconds
            row.proxyResidentBytes = ProcFS.residentBytes(of: proxy.pid)
        }
        let perHostTicks = zip(fleet, hostsBefore).map { (ProcFS.cpuTicks(of: $0.pid) ?? $1) - $1 }
        row.hostsCPUShare = Double(perHostTicks.reduce(0, +)) / ProcFS.ticksPerSecond / seconds
        let registrarTicks = zip(registrars.processes, registrarsBefore).map { (ProcFS.cpuTicks(of: $0.pid) ?? $1) - $1 }
        row.registrarsCPUShare = Double(registrarTicks.reduce(0, +)) / ProcFS.ticksPerSecond / seconds
        let bytesAfter = metrics(Self.sentBytesMetric)
        if let before = keepAlivesBefore, let after = metrics(Self.keepAliveMetric) {
            row.keepAlivesPerSecond = Double(after - before) / seconds
        }
        // The revision each change got, from a watch of the bench's own started only now, so
        // that its replay of the churn is not counted in etcd's bytes.
        let revisions = RevisionWatch(client: client, fromRevision: listed + 1)
        let changes = awaitChanges(sent, revisions: revisions, registrars: registrars)
        revisions.stop()
        row.unobservedChanges = sent.count - changes.count
        if let before = bytesBefore, let after = bytesAfter, !changes.isEmpty {
            row.etcdBytesPerChange = Double(after - before) / Double(changes.count)
        }
        row.etcdResidentBytes = ProcFS.residentBytes(of: etcdPID)
        let watches = (0..<hosts).map { watched(host: $0) }
        for filtered in [false, true] {
            let group = perHostTicks.indices.filter { (watches[$0] != nil) == filtered }
            guard !group.isEmpty else { continue }
            let share = Double(group.map { perHostTicks[$0] }.reduce(0, +)) / ProcFS.ticksPerSecond / seconds / Double(group.count)
            if filtered { row.filteredHostCPUShare = share } else { row.wholeHostCPUShare = share }
        }
        row.filteredHosts = watches.filter { $0 != nil }.count
        row.changes = changes.count
        _ = awaitRevisions(lastWatched(changes.map { ($0.service, $0.revision) }, floor: listed), logs: logs.path, since: 0,
                           fleet: fleet, timeout: 30_000)
        let applied = (0..<hosts).map { Self.readLog(logs.path, host: $0) }
        row.routing = RoutingFigures(changes: changes, applied: applied, watches: watches)
        row.wholeRouting = RoutingFigures(changes: changes, applied: applied, watches: watches, only: false)
        row.filteredRouting = RoutingFigures(changes: changes, applied: applied, watches: watches, only: true)
        progress("fleet, \(mode.rawValue): \(changes.count) changes; put -> routable on all hosts p99 "
            + "\(row.routing?.allHosts(99).map { Format.fixed($0, 1) } ?? "-") ms")

        // An etcd restart.
        etcd?.stop(keepingLog: etcdLog)
        etcd = nil
        let stopped = MonotonicClock.nanoseconds()
        usleep(500_000)
        let restarted = MonotonicClock.nanoseconds()
        etcd = try startEtcd(data: data.path, network: network)
        // A new instance: a put that changes nothing in the catalog publishes no table. Tried
        // again until etcd takes it (every host and registrar reconnects at once).
        let revision = try retrying("the put after the restart", for: Self.catchUpTimeout) {
            try await client.put(key: "\(Self.prefix)/service0/restarted", value: Self.instanceValue(service: 0, instance: 99))
        }
        if let caughtUp = awaitRevision(revision, logs: logs.path, since: stopped, fleet: fleet, timeout: Self.catchUpTimeout) {
            row.restartCatchUpSeconds = Double(caughtUp - restarted) / 1e9
        }
        // Listings again: the reads the new etcd served (its counters start at 0), and when
        // each host first applied a table after the new start.
        row.rangesAfterRestart = reads(network)
        var firstLines: [UInt64] = []
        for host in 0..<hosts {
            if let entry = Self.readLog(logs.path, host: host).first(where: { $0.time > restarted }) { firstLines.append(entry.time) }
        }
        if let first = firstLines.min(), let final = firstLines.max() {
            row.relistFirstSeconds = Double(Int64(first) - Int64(restarted)) / 1e9
            row.relistSpreadSeconds = Double(final - first) / 1e9
        }
        progress("fleet, \(mode.rawValue): etcd restarted; every host caught up after "
            + "\(row.restartCatchUpSeconds.map { Format.fixed($0, 2) } ?? "-") s, \(row.rangesAfterRestart.map(String.init) ?? "-") reads (Range, Txn) at etcd")
        try compactionHerd(client, fleet: fleet, network: network, logs: logs.path, into: &row) { () throws(BenchError) in
            etcd?.stop(keepingLog: etcdLog)
            etcd = nil
            etcd = try startEtcd(data: data.path, network: network)
            // Through a proxy, the hosts' streams end at the proxy, which would resume its own
            // watch and carry them through the restart: restarted too, so that they break.
            if mode == .proxy {
                proxy?.stop()
                proxy = nil
                proxy = try startProxy(network: network)
            }
        }
        return row
    }

    /// `body` as an etcd call, again after each failure until `milliseconds` have passed.
    private func retrying<Value: Sendable>(_ what: String, for milliseconds: Int64,
                                           _ body: @escaping @Sendable () async throws -> Value) throws(BenchError) -> Value {
        let deadline = MonotonicClock.milliseconds() + milliseconds
        while true {
            do {
                return try DiscoveryScenario.etcdCall(what, body)
            } catch {
                guard MonotonicClock.milliseconds() < deadline else { throw error }
                progress("fleet: \(error); trying again")
                usleep(200_000)
            }
        }
    }

    /// Every host stopped (SIGSTOP) while etcd (and the gRPC proxy) restart, which breaks their
    /// watch streams (the kernel resets them), and `herdChanges` puts go by, each a real change;
    /// etcd then compacts its history, and the hosts are resumed together: each host's watch
    /// resumes from a compacted revision, so each lists the registry again. (Without the
    /// restart, a stopped host's stream may still hold every event in its buffers and need no
    /// listing.) etcd's reads (Range and Txn requests) are sampled every 50 ms for the peak rate, until every
    /// host has applied the last put.
    private func compactionHerd(_ client: EtcdClient, fleet: [ChildProcess], network: FleetNetwork, logs: String,
                                into row: inout FleetRow, restartEtcd: () throws(BenchError) -> Void) throws(BenchError) {
        for host in fleet where !host.hasExited() { kill(host.pid, SIGSTOP) }
        let listingsBefore = (0..<fleet.count).map { Self.relistings(logs, host: $0) }
        var revision: Int64 = 0
        var puts: [(service: Int, revision: Int64)] = []
        do throws(BenchError) {
            try restartEtcd()
            for index in 0..<Self.herdChanges {
                let item = index % (services * Self.instancesPerService)
                // A port no earlier put used: every put changes its instance.
                let value = Array("{\"host\":\"127.0.0.1\",\"port\":\(3_000 + index),\"listen\":\(Self.firstPort + item / Self.instancesPerService)}".utf8)
                revision = try DiscoveryScenario.etcdCall("put") { try await client.put(key: Self.key(item), value: value) }
                puts.append((item / Self.instancesPerService, revision))
            }
            let compactAt = revision
            _ = try DiscoveryScenario.etcdCall("compact") { try await client.compact(revision: compactAt) }
        } catch {
            for host in fleet where !host.hasExited() { kill(host.pid, SIGCONT) }
            throw error
        }
        let targets = lastWatched(puts, floor: revision)
        let before = reads(network) ?? 0
        let resumed = MonotonicClock.nanoseconds()
        for host in fleet where !host.hasExited() { kill(host.pid, SIGCONT) }
        var last = before
        var peak: UInt64 = 0
        var done = [Bool](repeating: false, count: fleet.count)
        let deadline = MonotonicClock.milliseconds() + Self.catchUpTimeout
        var step = 0
        while MonotonicClock.milliseconds() < deadline {
            usleep(50_000)
            let now = reads(network) ?? last
            peak = max(peak, now - min(now, last))
            last = now
            step += 1
            // The logs every 250 ms: reading N files every 50 ms would weigh on the sampling.
            if step % 5 == 0 {
                for host in done.indices where !done[host] {
                    done[host] = Self.readLog(logs, host: host).contains { $0.revision >= targets[host] && $0.time > resumed }
                }
                if done.allSatisfy({ $0 }) { break }
            }
        }
        row.herdCaughtUp = done.filter { $0 }.count
        let listed = zip(0..<fleet.count, listingsBefore).map { Self.relistings(logs, host: $0) - $1 }
        row.herdRelisted = listed.filter { $0 > 0 }.count
        row.herdListings = listed.reduce(0, +)
        row.herdCatchUpSeconds = done.allSatisfy { $0 } ? Double(MonotonicClock.nanoseconds() - resumed) / 1e9 : nil
        row.herdRanges = last - min(last, before)
        row.herdPeakPerSecond = Double(peak) * 20
        progress("fleet: compaction herd: \(row.herdRanges ?? 0) reads (Range, Txn), peak \(Format.fixed(row.herdPeakPerSecond ?? 0, 0))/s, "
            + "\(row.herdCaughtUp) of \(fleet.count) hosts caught up (revision \(revision))")
        if let late = done.firstIndex(of: false) {
            let tail = (ProcFS.read("\(logs)/host\(late).log") ?? "").split(separator: "\n").suffix(3).joined(separator: " | ")
            progress("fleet: host\(late) did not catch up; last tables \(Self.readLog(logs, host: late).suffix(2).map(\.revision)); log: \(tail)")
        }
    }

    // MARK: Processes

    /// etcd's gRPC proxy on the proxy's host, in front of etcd.
    private func startProxy(network: FleetNetwork) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-fleet-proxy")
        do throws(BenchError) {
            let (path, arguments) = network.command(as: "proxy", DiscoveryScenario.etcdPath, [
                "grpc-proxy", "start", "--endpoints", "\(network.etcdAddress)", "--listen-addr", "\(network.proxyAddress)",
            ], favoured: true)
            return try Launcher.startExternal(name: "grpc-proxy", path: path, arguments: arguments, cpus: allCPUs, directory: directory,
                                              addresses: ["proxy": network.proxyAddress],
                                              reachable: { network.canConnect(from: "proxy", to: $0) }, timeout: Self.startTimeout)
        } catch {
            directory.remove()
            throw error
        }
    }

    /// etcd (one member) on its host, its data in `data`: the same ports and data when started
    /// again. On the bed it also listens on 127.0.0.1 inside its host, for nothing but its peer URL.
    private func startEtcd(data: String, network: FleetNetwork) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-fleet-etcd-log")
        do throws(BenchError) {
            let client = "\(network.etcdAddress)", peer = "http://127.0.0.1:\(network.etcdPeerPort)"
            let (path, arguments) = network.command(as: "etcd", DiscoveryScenario.etcdPath, [
                "--name", "fleet", "--data-dir", "\(data)/data",
                "--listen-client-urls", "http://\(client)", "--advertise-client-urls", "http://\(client)",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "fleet=\(peer)", "--initial-cluster-state", "new", "--logger", "zap", "--log-level", "warn",
            ], favoured: true)
            return try Launcher.startExternal(name: "etcd", path: path, arguments: arguments, cpus: allCPUs, directory: directory,
                                              addresses: ["etcd": network.etcdAddress],
                                              reachable: { network.canConnect(from: "etcd", to: $0) }, timeout: Self.startTimeout)
        } catch {
            directory.remove()
            throw error
        }
    }

    /// `berth discover` as host `index`: its services on the host's own address, no stats
    /// server, every applied table in `logs/hostN.rev`, its log in `logs/hostN.log`.
    private func spawnHost(_ index: Int, endpoint: String, logs: String, network: FleetNetwork) throws(BenchError) -> ChildProcess {
        let filter = watched(host: index).map { ["--services", $0.sorted().map { "service\($0)" }.joined(separator: ",")] } ?? []
        let (path, arguments) = network.command(as: "h\(index)", berth, [
            "discover", "--etcd", endpoint, "--prefix", Self.prefix, "--bind", network.address(of: "h\(index)"), "--workers", "1",
            "--stats", "off", "--linger", "0", "--drain-timeout", "0", "--revision-log", "\(logs)/host\(index).rev",
        ] + filter + (options.fleetRelistJitter.map { ["--relist-jitter", "\($0)"] } ?? []))
        return try Launcher.spawnOnCPUs(name: "host\(index)", path: path, arguments: arguments, cpus: allCPUs, logFile: "\(logs)/host\(index).log")
    }

    /// The services host `index` watches (`--services`), nil for all: the odd hosts watch
    /// service0 and a tenth of the services from a place of their own.
    func watched(host index: Int) -> Set<Int>? {
        guard index % 2 == 1 else { return nil }
        let count = max(1, services / 10)
        return Set([0] + (0..<count).map { (index * 7 + $0) % services })
    }

    /// For each host, the last of `changes` it watches (`floor` when none).
    private func lastWatched(_ changes: [(service: Int, revision: Int64)], floor: Int64) -> [Int64] {
        (0..<hosts).map { host in
            let services = watched(host: host)
            return changes.last { services?.contains($0.service) ?? true }?.revision ?? floor
        }
    }

    /// SIGTERM to every host first (they drain in parallel), then each reaped.
    private static func stopAll(_ fleet: [ChildProcess]) {
        for host in fleet where !host.hasExited() { kill(host.pid, SIGTERM) }
        for host in fleet { host.stop() }
    }

    // MARK: The registry

    static func instanceValue(service: Int, instance: Int) -> [UInt8] {
        Array("{\"host\":\"127.0.0.1\",\"port\":\(1_000 + instance),\"listen\":\(firstPort + service)}".utf8)
    }

    /// Copies the hosts' logs and etcd's (`--fleet-logs`) before their directory is removed.
    private static func copyLogs(_ from: String, to directory: String) {
        for path in [String(directory.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")), directory]
        where !path.isEmpty {
            _ = mkdir(path, 0o755)
        }
        guard let listing = opendir(from) else { return }
        defer { closedir(listing) }
        while let entry = readdir(listing) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard name.hasPrefix("host") || name == "etcd.log", let text = ProcFS.read("\(from)/\(name)") else { continue }
            let fd = open("\(directory)/\(name)", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                progress("fleet: cannot write \(directory)/\(name) (errno \(errno))")
                return
            }
            var bytes = Array(text.utf8)
            _ = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
    }

    /// How many times host `index` listed the registry again, from its log.
    static func relistings(_ logs: String, host index: Int) -> Int {
        (ProcFS.read("\(logs)/host\(index).log") ?? "").split(separator: "\n").filter { $0.hasSuffix("registry listed again") }.count
    }

    static func key(_ item: Int) -> String {
        "\(prefix)/service\(item / instancesPerService)/instance\(item % instancesPerService)"
    }

    /// Waits until the registry holds `count` keys (every registrar has put its share); the
    /// revision of that listing.
    private func awaitRegistry(_ client: EtcdClient, count: Int, registrars: FleetRegistrars) throws(BenchError) -> Int64 {
        let deadline = MonotonicClock.milliseconds() + Self.syncTimeout
        var seen = 0
        while MonotonicClock.milliseconds() < deadline {
            let listing = try DiscoveryScenario.etcdCall("list") { try await client.get(prefix: Self.prefix + "/") }
            seen = listing.keyValues.count
            if seen == count { return listing.revision }
            if let gone = registrars.processes.first(where: { $0.hasExited() }) {
                throw .child("\(gone.name) exited: \(ProcFS.read("\(registrars.directory)/host\(gone.name.dropFirst(9)).register.log")?.suffix(300) ?? "")")
            }
            usleep(250_000)
        }
        throw .child("the registrars put \(seen) of \(count) instances within \(Self.syncTimeout / 1000) s")
    }

    /// Adds and removes random instances at `changesPerSecond` for `churnSeconds`, each through
    /// its host's registrar (file, then SIGHUP). An instance changed in the last 2 s is not
    /// picked again: two signals close together may be taken as one reload.
    private func churn(_ registrars: FleetRegistrars) throws(BenchError) -> [SentChange] {
        let count = Int(churnSeconds * Self.changesPerSecond)
        let interval = UInt64(1e9 / Self.changesPerSecond)
        let recentLimit = Int(2 * Self.changesPerSecond)
        var recent: [Int] = []
        var sent: [SentChange] = []
        let start = MonotonicClock.nanoseconds()
        for index in 0..<count {
            let due = start + UInt64(index) * interval
            let now = MonotonicClock.nanoseconds()
            if due > now { usleep(useconds_t((due - now) / 1_000)) }
            var item = Int.random(in: 0..<registrars.items)
            while recent.contains(item) { item = Int.random(in: 0..<registrars.items) }
            recent.append(item)
            if recent.count > recentLimit { recent.removeFirst() }
            let time = MonotonicClock.nanoseconds()
            _ = try registrars.toggle(item)
            sent.append(SentChange(sent: time, key: registrars.key(of: item), service: item / Self.instancesPerService))
        }
        return sent
    }

    /// Each sent change with the revision etcd gave it: the next event of its key in the
    /// bench's watch. Waits up to 60 s for the last (registrars starved of CPU are late);
    /// changes never seen are left out.
    private func awaitChanges(_ sent: [SentChange], revisions: RevisionWatch, registrars: FleetRegistrars) -> [FleetChange] {
        let deadline = MonotonicClock.milliseconds() + 60_000
        var changes: [FleetChange] = []
        repeat {
            var used: [String: Int] = [:]
            changes = sent.compactMap { change in
                let seen = revisions.revisions(of: change.key)
                let index = used[change.key, default: 0]
                used[change.key] = index + 1
                return index < seen.count ? FleetChange(sent: change.sent, revision: seen[index], service: change.service) : nil
            }
            if changes.count == sent.count { break }
            usleep(100_000)
        } while MonotonicClock.milliseconds() < deadline
        if changes.count < sent.count { progress("fleet: \(sent.count - changes.count) of \(sent.count) changes never reached etcd's watch") }
        return changes
    }

    // MARK: Measuring

    static let sentBytesMetric = "etcd_network_client_grpc_sent_bytes_total "
    /// Keep-alive streams etcd started: Berth's registrar opens one per keep-alive.
    static let keepAliveMetric = "grpc_server_started_total{grpc_method=\"LeaseKeepAlive\""
    /// The Range and Txn requests etcd has started serving: a host lists its registry with
    /// one Range, or with `--services` a transaction of Range requests per 128 ranges (the
    /// registrars' puts and read-backs are transactions too, a few a second). etcd's gRPC
    /// proxy sends a Range for each watch created through it (its permission check).
    static let readMetrics = ["grpc_server_started_total{grpc_method=\"Range\"", "grpc_server_started_total{grpc_method=\"Txn\""]

    /// etcd's reads so far (nil when its /metrics did not answer): `readMetrics`, added up from
    /// one fetch.
    private func reads(_ network: FleetNetwork) -> UInt64? {
        guard let lines = metricLines(network) else { return nil }
        return lines.filter { line in Self.readMetrics.contains { line.hasPrefix($0) } }.compactMap(Self.value).reduce(0, +)
    }

    /// The value of the first line of etcd's /metrics that starts with `prefix`.
    private func metric(_ network: FleetNetwork, _ prefix: String) -> UInt64? {
        metricLines(network)?.first { $0.hasPrefix(prefix) }.flatMap(Self.value)
    }

    /// The lines of etcd's /metrics (read from inside etcd's host); nil when it did not answer.
    private func metricLines(_ network: FleetNetwork) -> [Substring]? {
        guard let response = network.fetch(from: "etcd", network.etcdAddress, path: "/metrics") else { return nil }
        return String(decoding: response, as: UTF8.self).split(separator: "\n")
    }

    /// A metric line's value (its last field); nil when it does not parse.
    private static func value(_ line: Substring) -> UInt64? {
        line.split(separator: " ").last.flatMap { Double($0) }.map { UInt64($0) }
    }

    /// A host's revision log: (revision, monotonic ns) per applied table, in order.
    static func readLog(_ directory: String, host: Int) -> [(revision: Int64, time: UInt64)] {
        guard let text = ProcFS.read("\(directory)/host\(host).rev") else { return [] }
        return text.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ")
            guard fields.count == 2, let revision = Int64(fields[0]), let time = UInt64(fields[1]) else { return nil }
            return (revision, time)
        }
    }

    /// Waits until every host has applied a table of `revision` or later after `since` (ns);
    /// the time the last one did, or nil at the timeout (or when a host exited).
    private func awaitRevision(_ revision: Int64, logs: String, since: UInt64, fleet: [ChildProcess], timeout: Int64) -> UInt64? {
        awaitRevisions([Int64](repeating: revision, count: fleet.count), logs: logs, since: since, fleet: fleet, timeout: timeout)
    }

    /// The time the last host applied its revision (`revisions[host]`), or nil.
    private func awaitRevisions(_ revisions: [Int64], logs: String, since: UInt64, fleet: [ChildProcess], timeout: Int64) -> UInt64? {
        let deadline = MonotonicClock.milliseconds() + timeout
        var done = [UInt64?](repeating: nil, count: fleet.count)
        while MonotonicClock.milliseconds() < deadline {
            for host in done.indices where done[host] == nil {
                done[host] = Self.readLog(logs, host: host).first { $0.revision >= revisions[host] && $0.time > since }?.time
            }
            if done.allSatisfy({ $0 != nil }) { return done.compactMap { $0 }.max() }
            if fleet.contains(where: { $0.hasExited() }) { return nil }
            usleep(50_000)
        }
        return nil
    }
}

/// One change the churn asked a registrar for: when, its key, its service.
struct SentChange {
    var sent: UInt64
    var key: String
    var service: Int
}

/// One change the churn made: when it was sent, the revision etcd gave it, its service.
struct FleetChange {
    var sent: UInt64
    var revision: Int64
    var service: Int
}

/// Put → routable, from the hosts' revision logs.
struct RoutingFigures {
    /// Per change: the time until the slowest host applied it (ms); nil entries are changes some
    /// host never applied.
    var allHosts: [Double] = []
    /// Per host and change (ms).
    var perHost: [Double] = []
    var missing = 0

    /// `watches[host]`: the services a host watches (nil: all); a change counts only on the
    /// hosts that watch its service. `only`: just the hosts with a filter (true) or without
    /// (false); nil: every host.
    init(changes: [FleetChange], applied: [[(revision: Int64, time: UInt64)]], watches: [Set<Int>?], only filtered: Bool? = nil) {
        for change in changes {
            var slowest = 0.0
            var complete = true
            for (host, log) in applied.enumerated() {
                if let filtered, (watches[host] != nil) != filtered { continue }
                if let services = watches[host], !services.contains(change.service) { continue }
                // The first line at or past the change's revision (revisions only grow in a log,
                // a listing again repeats one).
                guard let entry = log.first(where: { $0.revision >= change.revision }) else {
                    complete = false
                    missing += 1
                    continue
                }
                let milliseconds = Double(Int64(entry.time) - Int64(change.sent)) / 1e6
                perHost.append(milliseconds)
                slowest = max(slowest, milliseconds)
            }
            if complete { allHosts.append(slowest) }
        }
        allHosts.sort()
        perHost.sort()
    }

    func allHosts(_ percentile: Double) -> Double? { nearestRank(allHosts, percentile) }
    func perHost(_ percentile: Double) -> Double? { nearestRank(perHost, percentile) }
}

/// One configuration of the fleet (direct, or through the gRPC proxy).
struct FleetRow {
    var mode: String
    /// `namespaces` (the test bed) or `loopback`.
    var network = ""
    /// From the registrars' start until the registry held every instance.
    var registerSeconds: Double?
    var registrarMeanResidentBytes: UInt64?
    /// All registrars together, over the churn (cores).
    var registrarsCPUShare: Double?
    /// LeaseKeepAlive streams etcd started per second over the churn.
    var keepAlivesPerSecond: Double?
    /// Changes sent whose revision the bench's watch never saw (left out of the figures).
    var unobservedChanges = 0
    var syncSeconds: Double?
    var hostMeanResidentBytes: UInt64?
    var hostMaxResidentBytes: UInt64?
    var changes = 0
    var routing: RoutingFigures?
    var etcdCPUShare: Double?
    var etcdResidentBytes: UInt64?
    var etcdBytesPerChange: Double?
    var proxyCPUShare: Double?
    /// All hosts together, over the churn (cores).
    var hostsCPUShare: Double?
    var proxyResidentBytes: UInt64?
    var restartCatchUpSeconds: Double?
    /// Reads (Range, Txn) the restarted etcd served until every host caught up.
    var rangesAfterRestart: UInt64?
    var relistFirstSeconds: Double?
    var relistSpreadSeconds: Double?
    /// The compaction herd: reads (Range, Txn) etcd served, the highest rate over 50 ms windows,
    /// the hosts that caught up, and when the last did.
    var herdRanges: UInt64?
    var herdPeakPerSecond: Double?
    var herdCaughtUp = 0
    /// Hosts with `--services`, their mean CPU per host over the churn, and the others'.
    var filteredHosts = 0
    var filteredHostCPUShare: Double?
    var wholeHostCPUShare: Double?
    /// Put → routable per host, for the hosts watching every service and for the others.
    var wholeRouting: RoutingFigures?
    var filteredRouting: RoutingFigures?
    /// Hosts whose log says they listed the registry again during the herd.
    var herdRelisted: Int?
    /// Their listings in all (a host lists again once per compaction its watch meets).
    var herdListings: Int?
    var herdCatchUpSeconds: Double?
}

/// What the fleet scenario measured.
struct FleetResult {
    var hosts: Int
    var services: Int
    var churnSeconds: Double
    var skipped: String?
    var failures: [String] = []
    var rows: [FleetRow] = []
}
