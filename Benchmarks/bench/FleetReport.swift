import BerthRegistry

/// The fleet scenario's section of the report, and its JSON.
extension ScenarioReport {
    func fleetText(_ fleet: FleetResult) -> String {
        let network = fleet.rows.first?.network ?? ""
        var out = "Fleet: \(fleet.hosts) hosts, "
        out += network == "loopback" ? "each on a loopback address of its own, " : "each a network namespace on one bridge, "
        out += "each a berth register (its share of the registry, static, under its own lease, TTL \(FleetScenario.leaseSeconds) s) "
        out += "and a berth discover (1 worker, no stats server), on one etcd (\(DiscoveryScenario.etcdPath), one member), "
        out += "directly and through etcd grpc-proxy; \(Format.grouped(UInt64(fleet.services))) services x "
        out += "\(FleetScenario.instancesPerService) instances, then \(Format.fixed(FleetScenario.changesPerSecond, 0)) removals and "
        out += "additions a second for \(Format.fixed(fleet.churnSeconds, 0)) s, each a registrar's static file changed and a SIGHUP; "
        out += "the odd hosts watch only service0 and a tenth of the others "
        out += "(--services; their routing counts their services' changes); every process shares this machine's CPUs, etcd and the proxy at nice -10\n"
        if let skipped = fleet.skipped { return out + "skipped: \(skipped)\n\n" }
        guard !fleet.rows.isEmpty else { return out + "not measured (see the notes)\n\n" }
        func cell(_ value: Double?, _ digits: Int) -> String { value.map { Format.fixed($0, digits) } ?? "-" }
        func mebibytes(_ bytes: UInt64?) -> String { bytes.map { Format.fixed(Double($0) / 1_048_576, 1) } ?? "-" }
        let rows: [(String, (FleetRow) -> String)] = [
            ("network", { $0.network }),
            ("registrars put all, s", { cell($0.registerSeconds, 1) }),
            ("first listing on all, s", { cell($0.syncSeconds, 1) }),
            ("changes", { Format.grouped(UInt64($0.changes)) }),
            ("changes etcd never showed", { String($0.unobservedChanges) }),
            ("routable on all p50, ms", { cell($0.routing?.allHosts(50), 1) }),
            ("routable on all p99, ms", { cell($0.routing?.allHosts(99), 1) }),
            ("routable on all max, ms", { cell($0.routing?.allHosts(100), 1) }),
            ("per host p50, ms", { cell($0.routing?.perHost(50), 1) }),
            ("per host p99, ms", { cell($0.routing?.perHost(99), 1) }),
            ("never applied (host x change)", { String($0.routing?.missing ?? 0) }),
            ("etcd CPU, share of a core", { cell($0.etcdCPUShare, 2) }),
            ("etcd RSS, MiB", { mebibytes($0.etcdResidentBytes) }),
            ("etcd bytes sent per change", { $0.etcdBytesPerChange.map { Format.grouped(UInt64($0)) } ?? "-" }),
            ("lease keep-alives at etcd, /s", { cell($0.keepAlivesPerSecond, 0) }),
            ("grpc-proxy CPU, share", { cell($0.proxyCPUShare, 2) }),
            ("grpc-proxy RSS, MiB", { mebibytes($0.proxyResidentBytes) }),
            ("hosts' CPU, cores (all)", { cell($0.hostsCPUShare, 2) }),
            ("hosts with --services", { String($0.filteredHosts) }),
            ("CPU per host, all services, %", { cell($0.wholeHostCPUShare.map { $0 * 100 }, 2) }),
            ("CPU per host, --services, %", { cell($0.filteredHostCPUShare.map { $0 * 100 }, 2) }),
            ("per host p50, all services, ms", { cell($0.wholeRouting?.perHost(50), 1) }),
            ("per host p50, --services, ms", { cell($0.filteredRouting?.perHost(50), 1) }),
            ("per host p99, all services, ms", { cell($0.wholeRouting?.perHost(99), 1) }),
            ("per host p99, --services, ms", { cell($0.filteredRouting?.perHost(99), 1) }),
            ("host RSS mean, MiB", { mebibytes($0.hostMeanResidentBytes) }),
            ("host RSS max, MiB", { mebibytes($0.hostMaxResidentBytes) }),
            ("registrars' CPU, cores (all)", { cell($0.registrarsCPUShare, 2) }),
            ("registrar RSS mean, MiB", { mebibytes($0.registrarMeanResidentBytes) }),
            ("etcd restart: all caught up, s", { cell($0.restartCatchUpSeconds, 2) }),
            ("reads at etcd then (Range, Txn)", { $0.rangesAfterRestart.map(String.init) ?? "-" }),
            ("first host's table after, s", { cell($0.relistFirstSeconds, 2) }),
            ("first to last host, s", { cell($0.relistSpreadSeconds, 2) }),
            ("herd: reads at etcd (Range, Txn)", { $0.herdRanges.map(String.init) ?? "-" }),
            ("herd: peak read rate, /s", { cell($0.herdPeakPerSecond, 0) }),
            ("herd: hosts that listed again", { $0.herdRelisted.map(String.init) ?? "-" }),
            ("herd: their listings", { $0.herdListings.map(String.init) ?? "-" }),
            ("herd: hosts caught up", { String($0.herdCaughtUp) }),
            ("herd: last caught up, s", { cell($0.herdCatchUpSeconds, 2) }),
        ]
        out += Self.row("", fleet.rows.map(\.mode))
        for (label, value) in rows { out += Self.row(label, fleet.rows.map(value)) }
        out += "targets: routable on all p99 < \(Format.fixed(FleetScenario.targetP99Milliseconds, 0)) ms through the proxy; "
        out += "all caught up within \(Format.fixed(FleetScenario.targetCatchUpSeconds, 0)) s of an etcd restart; "
        out += "etcd bytes per change through the proxy at most a tenth of the direct figure"
        if let direct = fleet.rows.first(where: { $0.mode == FleetScenario.Mode.direct.rawValue })?.etcdBytesPerChange,
           let proxied = fleet.rows.first(where: { $0.mode == FleetScenario.Mode.proxy.rawValue })?.etcdBytesPerChange, direct > 0 {
            out += " (measured: \(Format.fixed(proxied / direct, 3))x)"
        }
        return out + "\n\n"
    }

    func fleetJSON(_ fleet: FleetResult) -> JSONValue {
        if let skipped = fleet.skipped { return .object([("skipped", .string(skipped))]) }
        return .object([
            ("hosts", .integer(Int64(fleet.hosts))), ("services", .integer(Int64(fleet.services))),
            ("rows", .array(fleet.rows.map { row in
                .object([
                    ("mode", .string(row.mode)), ("network", .string(row.network)),
                    ("registerSeconds", .optional(row.registerSeconds)), ("syncSeconds", .optional(row.syncSeconds)),
                    ("unobservedChanges", .integer(Int64(row.unobservedChanges))),
                    ("keepAlivesPerSecond", .optional(row.keepAlivesPerSecond)),
                    ("registrarsCPUShare", .optional(row.registrarsCPUShare)),
                    ("registrarMeanResidentBytes", .optional(row.registrarMeanResidentBytes.map(Double.init))),
                    ("changes", .integer(Int64(row.changes))),
                    ("routableOnAllP50Milliseconds", .optional(row.routing?.allHosts(50))),
                    ("routableOnAllP99Milliseconds", .optional(row.routing?.allHosts(99))),
                    ("routableOnAllMaxMilliseconds", .optional(row.routing?.allHosts(100))),
                    ("perHostP99Milliseconds", .optional(row.routing?.perHost(99))),
                    ("etcdCPUShare", .optional(row.etcdCPUShare)), ("etcdBytesPerChange", .optional(row.etcdBytesPerChange)),
                    ("etcdResidentBytes", .optional(row.etcdResidentBytes.map(Double.init))),
                    ("proxyCPUShare", .optional(row.proxyCPUShare)), ("hostsCPUShare", .optional(row.hostsCPUShare)),
                    ("filteredHosts", .integer(Int64(row.filteredHosts))),
                    ("wholeHostCPUShare", .optional(row.wholeHostCPUShare)), ("filteredHostCPUShare", .optional(row.filteredHostCPUShare)),
                    ("wholePerHostP99Milliseconds", .optional(row.wholeRouting?.perHost(99))),
                    ("filteredPerHostP99Milliseconds", .optional(row.filteredRouting?.perHost(99))),
                    ("hostMeanResidentBytes", .optional(row.hostMeanResidentBytes.map(Double.init))),
                    ("restartCatchUpSeconds", .optional(row.restartCatchUpSeconds)),
                    ("rangesAfterRestart", .optional(row.rangesAfterRestart.map(Double.init))),
                    ("herdRanges", .optional(row.herdRanges.map(Double.init))), ("herdPeakPerSecond", .optional(row.herdPeakPerSecond)),
                    ("herdCatchUpSeconds", .optional(row.herdCatchUpSeconds)),
                    ("herdRelisted", .optional(row.herdRelisted.map(Double.init))),
                    ("herdListings", .optional(row.herdListings.map(Double.init))), ("relistSpreadSeconds", .optional(row.relistSpreadSeconds)),
                ])
            })),
            ("failures", .array(fleet.failures.map { .string($0) })),
        ])
    }
}
