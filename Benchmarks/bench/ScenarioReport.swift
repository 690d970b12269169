import BerthEngine
import BerthRegistry
import BerthSystem

/// The scenarios' sections of the report (text and JSON), and their notes.
struct ScenarioReport {
    let results: ScenarioResults
    let options: BenchOptions
    let proxyCPU: Int
    let loadCPU: Int

    static let labelWidth = 30
    static let columnWidth = 11

    static func row(_ label: String, _ cells: [String]) -> String {
        Format.pad(label, labelWidth, alignRight: false) + cells.map { Format.pad($0, columnWidth) }.joined() + "\n"
    }

    private static func milliseconds(_ value: Double?, _ digits: Int) -> String {
        value.map { Format.fixed($0, digits) } ?? "-"
    }

    private static func percent(_ share: Double?, _ digits: Int = 0) -> String {
        share.map { Format.fixed($0 * 100, digits) } ?? "-"
    }

    // MARK: Text

    func text() -> String {
        var out = ""
        if let rows = results.failover { out += failoverText(rows) }
        if let checks = results.checks { out += checksText(checks) }
        if let discovery = results.discovery { out += discoveryText(discovery) }
        if let statsFuzz = results.statsFuzz { out += statsFuzzText(statsFuzz) }
        if let hosts = results.hosts { out += hostsText(hosts) }
        if let features = results.features { out += featuresText(features) }
        if let fleet = results.fleet { out += fleetText(fleet) }
        return out
    }

    private func statsFuzzText(_ fuzz: StatsFuzzResult) -> String {
        var out = "Stats port under fuzzing: keep-alive requests (\(options.keepAliveConnections) connections, "
        out += "\(Format.fixed(options.phaseSeconds, 1)) s windows after \(Format.fixed(options.warmupSeconds, 1)) s warm-up) through "
        out += "berth proxy --stats, one proxy for every window; the data plane (its worker, 2 whoami backends, the load generator) "
        out += "on CPU \(proxyCPU), the fuzzer on CPU \(loadCPU); the proxy's stats thread"
        out += fuzz.statsThreads.isEmpty ? "" : " (" + fuzz.statsThreads.map { "\($0.name), nice \($0.nice.map { "\($0)" } ?? "?")" }
            .joined(separator: "; ") + ")"
        out += " on CPU \(loadCPU) (apart), then on CPU \(proxyCPU) with the data plane (shared); windows in each "
        out += StatsFuzzScenario.order(options).map { $0 ? "fuzzed" : "quiet" }.joined(separator: ", ") + "\n"
        if let skipped = fuzz.skipped { return out + "skipped: \(skipped)\n\n" }
        out += Self.row("", ["req/s", "lowest", "highest", "worker", "stats", "fuzzed", "windows"])
        out += Self.row("", ["mean", "window", "window", "us/req", "thread %", "req/s", ""])
        for shared in [false, true] {
            let layout = shared ? "shared" : "apart"
            for fuzzing in [false, true] {
                let windows = fuzz.windows(shared: shared, fuzzing: fuzzing)
                let rates = windows.map(\.requestsPerSecond)
                let statsShares = windows.compactMap(\.statsThreadShare)
                let fuzzed = windows.compactMap { window in window.fuzz.map { Double($0["requests"]) / max(window.seconds, 1e-9) } }
                out += Self.row("\(layout), \(fuzzing ? "stats port fuzzed" : "quiet")", [
                    fuzz.mean(shared: shared, fuzzing: fuzzing).map { Format.rate($0) } ?? "-", rates.min().map { Format.rate($0) } ?? "-",
                    rates.max().map { Format.rate($0) } ?? "-",
                    fuzz.meanWorkerCost(shared: shared, fuzzing: fuzzing).map { Format.fixed($0, 2) } ?? "-",
                    statsShares.isEmpty ? "-" : Self.percent(statsShares.reduce(0, +) / Double(statsShares.count)),
                    fuzzed.isEmpty ? "-" : Format.rate(fuzzed.reduce(0, +) / Double(fuzzed.count)), "\(windows.count)",
                ])
            }
            out += Self.row("\(layout), fuzzed / quiet", [Format.ratio(fuzz.ratio(shared: shared)), "", "",
                                                           Format.ratio(fuzz.workerRatio(shared: shared)), "", "", ""])
        }
        if let totals = fuzz.fuzzTotals {
            out += "fuzzer, all fuzzed windows: \(Format.grouped(totals["requests"])) requests (\(Format.grouped(fuzz.measuredFuzzRequests)) "
            out += "in the measured windows) on \(Format.grouped(totals["connections"])) connections; pipelined requests answered "
            out += "\(Format.grouped(totals["pipelined_answers"])); single requests: 400 \(Format.grouped(totals["status400"])), "
            out += "413 \(Format.grouped(totals["status413"])), 431 \(Format.grouped(totals["status431"])), other "
            out += "\(Format.grouped(totals["other_status"])), closed without an answer \(Format.grouped(totals["no_answer"])); "
            out += "connects failed \(Format.grouped(totals["connect_failures"])); slowloris connections closed by the server "
            out += "\(Format.grouped(totals["slowloris_closed"])); /healthz probes \(Format.grouped(totals["probes"])), failed "
            out += "\(Format.grouped(totals["probe_failures"])), slowest \(Format.fixed(Double(totals["slowest_probe_us"]) / 1_000, 1)) ms\n"
        }
        out += "after the last window: proxy \(fuzz.aliveAfter ? "running" : "GONE"), stats page \(fuzz.pageAfter ? "answers" : "DOES NOT ANSWER")"
        out += ", open fds \(fuzz.descriptorsBefore.map { "\($0)" } ?? "-") before the windows, \(fuzz.descriptorsAfter.map { "\($0)" } ?? "-") after"
        out += ", RSS \(Self.mebibytes(fuzz.residentBefore)) MiB before, \(Self.mebibytes(fuzz.residentAfter)) MiB after\n\n"
        return out
    }

    private func failoverText(_ rows: [FailoverRow]) -> String {
        let timeline = results.timeline
        let victim = "app\(FailoverScenario.victimIndex)"
        var out = "Failover: new connections (\(options.concurrentConnects) in flight, one request each, Connection: close) for "
        out += "\(Format.fixed(timeline.duration, 1)) s through the proxy (CPU \(proxyCPU)) to \(FailoverScenario.backendCount) whoami "
        out += "processes (CPU \(loadCPU)); \(victim) gets SIGKILL at \(Format.fixed(timeline.killAt, 1)) s and is restarted on its port at "
        out += "\(Format.fixed(timeline.restartAt, 1)) s; fresh backends and proxy per row\n"
        out += "berth: berth proxy " + FailoverScenario.berthFlags.joined(separator: " ")
        out += " (1 worker, relay \(EngineConfiguration().relay.rawValue))\n"
        out += "haproxy: option httpchk GET /, check inter \(FailoverScenario.checkInterval)ms rise \(FailoverScenario.rise) "
        out += "fall \(FailoverScenario.fall) observe layer4 error-limit \(FailoverScenario.observeErrors) on-error mark-down, "
        out += "retries \(FailoverScenario.retries), option redispatch (nbthread 1)\n"
        out += Self.row("", ["answered", "failed", "ejected", "refused", "back", "p99", "max"])
        out += Self.row("", ["", "", "ms after", "connects", "ms after", "ms", "ms"])
        out += Self.row("", ["", "", "SIGKILL", "", "restart", "", ""])
        for row in rows {
            if let skipped = row.skipped {
                out += Format.pad(row.label, Self.labelWidth, alignRight: false) + "  skipped: \(skipped)\n"
                continue
            }
            out += Self.row(row.label, [
                Format.grouped(row.completed), Format.grouped(row.failed), Self.milliseconds(row.ejectionMilliseconds, 1),
                row.ejectionMilliseconds == nil ? "-" : Format.grouped(row.refusedConnects), Self.milliseconds(row.backMilliseconds, 0),
                Format.fixed(row.p99Milliseconds, 2), Format.fixed(row.maxMilliseconds, 1),
            ])
        }
        let interval = FailoverScenario.checkInterval
        let fall = Int64(FailoverScenario.fall)
        let rise = Int64(FailoverScenario.rise)
        out += "for reference, with active checks alone: ejected \((fall - 1) * interval)-\(fall * interval) ms after the SIGKILL "
        out += "((fall - 1) to fall intervals, as the next check falls), up again \((rise - 1) * interval)-\(rise * interval) ms after "
        out += "the restart (rise - 1 to rise intervals); each interval jittered by 10%\n\n"
        return out
    }

    private func checksText(_ checks: ChecksResult) -> String {
        let targets = Format.grouped(UInt64(checks.targets))
        var out = "Health-check overhead: keep-alive requests (\(options.keepAliveConnections) connections, "
        out += "\(Format.fixed(options.phaseSeconds, 1)) s windows after \(Format.fixed(options.warmupSeconds, 1)) s warm-up) through berth proxy "
        out += "(1 worker on CPU \(proxyCPU)), without checks and with \(targets) extra backends HTTP-checked every "
        out += "\(DurationText.format(milliseconds: checks.intervalMilliseconds)) (accept-and-close listeners on CPU \(loadCPU): "
        out += "their checks fail, so they take no traffic); windows "
        out += ChecksScenario.order(options).map { $0 ? "on" : "off" }.joined(separator: ", ") + ", a fresh proxy each\n"
        if let skipped = checks.skipped { return out + "skipped: \(skipped)\n\n" }
        out += Self.row("", ["req/s", "lowest", "highest", "proxy CPU", "worker", "CPU \(loadCPU)", "windows"])
        out += Self.row("", ["mean", "window", "window", "%", "us/req", "busy %", ""])
        for enabled in [false, true] {
            let windows = checks.windows.filter { $0.checks == enabled }
            let load = windows.compactMap(\.loadCPUShare)
            let rates = windows.map(\.requestsPerSecond)
            out += Self.row(enabled ? "\(targets) checks every \(DurationText.format(milliseconds: checks.intervalMilliseconds))" : "no checks", [
                checks.mean(checks: enabled).map { Format.rate($0) } ?? "-", rates.min().map { Format.rate($0) } ?? "-",
                rates.max().map { Format.rate($0) } ?? "-", Self.percent(checks.meanProxyShare(checks: enabled)),
                checks.meanWorkerCost(checks: enabled).map { Format.fixed($0, 2) } ?? "-",
                load.isEmpty ? "-" : Self.percent(load.reduce(0, +) / Double(load.count)), "\(windows.count)",
            ])
        }
        var proxyRatio: Double?
        if let with = checks.meanProxyShare(checks: true), let without = checks.meanProxyShare(checks: false), without > 0 {
            proxyRatio = with / without
        }
        var workerRatio: Double?
        if let with = checks.meanWorkerCost(checks: true), let without = checks.meanWorkerCost(checks: false), without > 0 {
            workerRatio = with / without
        }
        out += Self.row("with / without", [Format.ratio(checks.ratio), "", "", Format.ratio(proxyRatio), Format.ratio(workerRatio), "", ""])
        for idle in checks.idle {
            out += "idle with \(idle.kind) checks (\(Format.fixed(idle.seconds, 1)) s): \(Format.rate(idle.checksPerSecond)) checks/s "
            out += "(accepted by the listeners); proxy process \(Self.percent(idle.proxyShare, 1))% of a core, its checker thread "
            out += "\(Self.percent(idle.checkerShare, 1))% (\(idle.microsecondsPerCheck.map { Format.fixed($0, 1) } ?? "-") us per check); "
            out += "listeners \(Self.percent(idle.listenersShare, 1))%; the busiest 100 ms held "
            out += "\(idle.busiestTenthShare.map { Format.fixed($0 * 100, 0) } ?? "-")% of a second's checks (10% if spread evenly)\n"
        }
        return out + "\n"
    }

    private func discoveryText(_ discovery: DiscoveryResult) -> String {
        var out = "Discovery: berth discover (1 worker on CPU \(proxyCPU), --linger 0, no checks) on a real etcd "
        out += "(\(DiscoveryScenario.etcdPath), one member on CPU \(loadCPU), its data under /tmp)\n"
        if let skipped = discovery.skipped { return out + "skipped: \(skipped)\n\n" }
        out += "propagation: \(Format.grouped(UInt64(discovery.puts))) puts of one instance key, pointing at web0 and web1 in turn; "
        out += "from just before the put until a new connection through the service is answered by the new backend "
        out += "(each wait at most \(DurationText.format(milliseconds: DiscoveryScenario.routeTimeout)))\n"
        if let propagation = discovery.propagation {
            out += Self.row("", ["p50", "p90", "p99", "max", "timeouts"])
            out += Self.row("put -> routable, ms", [50.0, 90, 99, 100].map { Self.milliseconds(propagation.routeMilliseconds($0), 2) }
                + [Format.grouped(UInt64(propagation.timeouts))])
            out += Self.row("put -> etcd ack, ms", [50.0, 90, 99, 100].map { Self.milliseconds(propagation.putMilliseconds($0), 2) } + [""])
            let target = Format.fixed(DiscoveryScenario.targetP99Milliseconds, 0)
            out += "target p99 < \(target) ms (with no timeout): " + (discovery.targetMet.map { $0 ? "met" : "not met" } ?? "-")
            out += "; \(Format.grouped(UInt64(propagation.staleAnswers))) answers still from the previous backend after the acks\n"
        } else {
            out += "propagation: not measured (see the notes)\n"
        }
        let instances = Format.grouped(UInt64(discovery.instances))
        out += "initial sync: \(Format.grouped(UInt64(discovery.services))) services x \(discovery.instancesPerService) instances "
        out += "(\(instances) keys, each service on a port of its own) written before berth discover starts"
        guard let sync = discovery.sync else { return out + ": not measured (see the notes)\n\n" }
        out += " (\(sync.transactions) transactions, \(Format.fixed(sync.writeSeconds, 2)) s):\n"
        out += "every service port accepting \(Self.milliseconds(sync.allPortsMilliseconds, 0)) ms after the spawn (the first "
        out += "\(Self.milliseconds(sync.firstPortMilliseconds, 0)) ms); RSS then \(Self.mebibytes(sync.residentBytes)) MiB, with an "
        out += "empty registry \(Self.mebibytes(sync.emptyResidentBytes)) MiB: "
        out += "\(sync.kilobytesPerInstance(discovery.instances).map { Format.fixed($0, 2) } ?? "-") KiB per instance\n\n"
        return out
    }

    private static func mebibytes(_ bytes: UInt64?) -> String {
        bytes.map { Format.fixed(Double($0) / 1_048_576, 1) } ?? "-"
    }

    // MARK: Notes

    func notes() -> [String] {
        var notes = results.notes
        for row in results.failover ?? [] where row.skipped == nil {
            if row.failed > 0 {
                notes.append("failover \(row.label): \(row.failed) failed: "
                    + row.reasons.prefix(4).map { "\($0.count) \($0.reason)" }.joined(separator: "; "))
            }
            for remark in row.remarks { notes.append("failover \(row.label): \(remark)") }
            if row.ejectionMilliseconds == nil {
                notes.append("failover \(row.label): no refused connect after the SIGKILL: the ejection time could not be seen")
            }
            let answers = row.answers.sorted { $0.key < $1.key }.map { "\($0.key) \(Format.grouped($0.value))" }.joined(separator: ", ")
            notes.append("failover \(row.label): answers per backend: \(answers); the restarted backend was listening "
                + "\(Self.milliseconds(row.restartMilliseconds, 0)) ms after it was spawned")
        }
        if results.failover?.contains(where: { $0.skipped == nil }) == true {
            notes.append("failover: \"ejected\" is the end of the burst of refused connects after the SIGKILL (the kernel's "
                + "AttemptFails, /proc/net/snmp, sampled every ms; a refusal more than \(FailoverScenario.burstGap / 1_000_000) ms "
                + "after the previous one, such as the dead backend's next check, ends it); the counter covers the whole machine, "
                + "so other processes' refused connects would show in \"refused connects\"")
        }
        if let checks = results.checks {
            for failure in checks.failures { notes.append("checks: \(failure)") }
            for window in checks.windows where window.disturbance >= 0.1 || window.errors > 0 {
                notes.append("checks: a window \(window.checks ? "with" : "without") checks was disturbed (other processes and steal: "
                    + "\(Format.fixed(window.disturbance, 2)) CPU)" + (window.errors > 0 ? " and had \(window.errors) errors" : ""))
            }
        }
        for failure in results.fleet?.failures ?? [] { notes.append("fleet: \(failure)") }
        if let features = results.features {
            for failure in features.failures { notes.append("features: \(failure)") }
            for window in features.windows where window.disturbance >= 0.1 || window.errors > 0 {
                notes.append("features: the \(window.variant) window of round \(window.round + 1) was disturbed (other processes and steal: "
                    + "\(Format.fixed(window.disturbance, 2)) CPU)" + (window.errors > 0 ? " and had \(window.errors) errors" : ""))
            }
        }
        if let statsFuzz = results.statsFuzz {
            for failure in statsFuzz.failures { notes.append("stats-fuzz: \(failure)") }
            for window in statsFuzz.windows where window.disturbance >= 0.1 || window.errors > 0 {
                notes.append("stats-fuzz: a \(window.shared ? "shared" : "apart") \(window.fuzzing ? "fuzzed" : "quiet") window was disturbed (other processes and steal: "
                    + "\(Format.fixed(window.disturbance, 2)) CPU)" + (window.errors > 0 ? " and had \(window.errors) errors" : ""))
            }
        }
        if let discovery = results.discovery {
            for failure in discovery.failures { notes.append("discovery: \(failure)") }
            if discovery.propagation != nil {
                notes.append("discovery: the propagation's clock starts before the put and the requests through the service start "
                    + "after etcd's acknowledgement, so no time is below the put's own; etcd fsyncs its log on /tmp's disk "
                    + "(\"put -> etcd ack\"), the part of the propagation that is etcd's")
            }
            if discovery.sync?.emptyResidentBytes == nil && discovery.sync != nil {
                notes.append("discovery: the empty-registry berth discover never logged its watch: no baseline RSS")
            }
        }
        return notes
    }

    // MARK: JSON

    func json() -> JSONValue {
        var members: [(String, JSONValue)] = [("berth", results.berthPath.map { .string($0) } ?? .null)]
        if let rows = results.failover {
            let timeline = results.timeline
            members.append(("failover", .object([
                ("killAtSeconds", .number(timeline.killAt)), ("restartAtSeconds", .number(timeline.restartAt)),
                ("durationSeconds", .number(timeline.duration)),
                ("checkIntervalMs", .integer(FailoverScenario.checkInterval)), ("rise", .integer(Int64(FailoverScenario.rise))),
                ("fall", .integer(Int64(FailoverScenario.fall))), ("observeErrors", .integer(Int64(FailoverScenario.observeErrors))),
                ("rows", .array(rows.map(failoverJSON))),
            ])))
        }
        if let checks = results.checks { members.append(("checks", checksJSON(checks))) }
        if let discovery = results.discovery { members.append(("discovery", discoveryJSON(discovery))) }
        if let statsFuzz = results.statsFuzz { members.append(("statsFuzz", statsFuzzJSON(statsFuzz))) }
        if let hosts = results.hosts { members.append(("hosts", hostsJSON(hosts))) }
        if let features = results.features { members.append(("features", featuresJSON(features))) }
        if let fleet = results.fleet { members.append(("fleet", fleetJSON(fleet))) }
        return .object(members)
    }

    private func statsFuzzJSON(_ fuzz: StatsFuzzResult) -> JSONValue {
        if let skipped = fuzz.skipped { return .object([("skipped", .string(skipped))]) }
        func totals(_ totals: FuzzTotals) -> JSONValue {
            .object(FuzzTotals.keys.map { ($0, .integer(Int64(clamping: totals[$0]))) })
        }
        return .object([
            ("windows", .array(fuzz.windows.map { window in
                .object([
                    ("layout", .string(window.shared ? "shared" : "apart")),
                    ("fuzzing", .bool(window.fuzzing)), ("requestsPerSecond", .number(window.requestsPerSecond)),
                    ("workerMicrosecondsPerRequest", .optional(window.workerMicrosecondsPerRequest)),
                    ("statsThreadCPUPercent", .optional(window.statsThreadShare.map { $0 * 100 })),
                    ("fuzz", window.fuzz.map(totals) ?? .null), ("seconds", .number(window.seconds)),
                    ("disturbanceCPUs", .number(window.disturbance)), ("errors", .integer(Int64(window.errors))),
                ])
            })),
            ("apart", .object([
                ("quiet", .optional(fuzz.mean(shared: false, fuzzing: false))), ("fuzzed", .optional(fuzz.mean(shared: false, fuzzing: true))),
                ("ratio", .optional(fuzz.ratio(shared: false))), ("workerCostRatio", .optional(fuzz.workerRatio(shared: false))),
            ])),
            ("shared", .object([
                ("quiet", .optional(fuzz.mean(shared: true, fuzzing: false))), ("fuzzed", .optional(fuzz.mean(shared: true, fuzzing: true))),
                ("ratio", .optional(fuzz.ratio(shared: true))), ("workerCostRatio", .optional(fuzz.workerRatio(shared: true))),
            ])),
            ("fuzzTotals", fuzz.fuzzTotals.map(totals) ?? .null),
            ("statsThreads", .array(fuzz.statsThreads.map { thread in
                .object([("name", .string(thread.name)), ("nice", thread.nice.map { .integer(Int64($0)) } ?? .null)])
            })),
            ("aliveAfter", .bool(fuzz.aliveAfter)), ("pageAfter", .bool(fuzz.pageAfter)),
            ("descriptorsBefore", fuzz.descriptorsBefore.map { .integer(Int64($0)) } ?? .null),
            ("descriptorsAfter", fuzz.descriptorsAfter.map { .integer(Int64($0)) } ?? .null),
            ("residentBytesBefore", fuzz.residentBefore.map { .integer(Int64(clamping: $0)) } ?? .null),
            ("residentBytesAfter", fuzz.residentAfter.map { .integer(Int64(clamping: $0)) } ?? .null),
            ("failures", .array(fuzz.failures.map { .string($0) })),
        ])
    }

    private func discoveryJSON(_ discovery: DiscoveryResult) -> JSONValue {
        var members: [(String, JSONValue)] = [
            ("puts", .integer(Int64(discovery.puts))), ("services", .integer(Int64(discovery.services))),
            ("instancesPerService", .integer(Int64(discovery.instancesPerService))),
        ]
        if let skipped = discovery.skipped { return .object(members + [("skipped", .string(skipped))]) }
        if let propagation = discovery.propagation {
            func percentiles(_ value: (Double) -> Double?) -> JSONValue {
                .object([("p50", .optional(value(50))), ("p90", .optional(value(90))), ("p99", .optional(value(99))), ("max", .optional(value(100)))])
            }
            members.append(("propagation", .object([
                ("routableMs", percentiles(propagation.routeMilliseconds)), ("putAckMs", percentiles(propagation.putMilliseconds)),
                ("timeouts", .integer(Int64(propagation.timeouts))), ("staleAnswers", .integer(Int64(propagation.staleAnswers))),
                ("routeTimeoutMs", .integer(DiscoveryScenario.routeTimeout)),
                ("targetP99Ms", .number(DiscoveryScenario.targetP99Milliseconds)), ("targetMet", discovery.targetMet.map { .bool($0) } ?? .null),
            ])))
        }
        if let sync = discovery.sync {
            members.append(("initialSync", .object([
                ("transactions", .integer(Int64(sync.transactions))), ("writeSeconds", .number(sync.writeSeconds)),
                ("firstPortMs", .optional(sync.firstPortMilliseconds)), ("allPortsMs", .optional(sync.allPortsMilliseconds)),
                ("rssKiB", .optional(sync.residentBytes.map { Double($0) / 1024 })),
                ("emptyRegistryRssKiB", .optional(sync.emptyResidentBytes.map { Double($0) / 1024 })),
                ("kibPerInstance", .optional(sync.kilobytesPerInstance(discovery.instances))),
            ])))
        }
        return .object(members + [("failures", .array(discovery.failures.map { .string($0) }))])
    }

    private func failoverJSON(_ row: FailoverRow) -> JSONValue {
        if let skipped = row.skipped { return .object([("name", .string(row.name)), ("skipped", .string(skipped))]) }
        return .object([
            ("name", .string(row.name)), ("answered", .integer(Int64(row.completed))), ("failed", .integer(Int64(row.failed))),
            ("failureReasons", .object(row.reasons.map { ($0.reason, .integer(Int64($0.count))) })),
            ("ejectionMs", .optional(row.ejectionMilliseconds)), ("refusedConnects", .integer(Int64(row.refusedConnects))),
            ("backAfterRestartMs", .optional(row.backMilliseconds)), ("restartMs", .optional(row.restartMilliseconds)),
            ("p99Ms", .number(row.p99Milliseconds)), ("maxMs", .number(row.maxMilliseconds)), ("seconds", .number(row.seconds)),
            ("answers", .object(row.answers.sorted { $0.key < $1.key }.map { ($0.key, .integer(Int64($0.value))) })),
            ("remarks", .array(row.remarks.map { .string($0) })),
        ])
    }

    private func checksJSON(_ checks: ChecksResult) -> JSONValue {
        var members: [(String, JSONValue)] = [
            ("targets", .integer(Int64(checks.targets))), ("intervalMs", .integer(checks.intervalMilliseconds)),
        ]
        if let skipped = checks.skipped { return .object(members + [("skipped", .string(skipped))]) }
        members += [
            ("windows", .array(checks.windows.map { window in
                .object([
                    ("checks", .bool(window.checks)), ("requestsPerSecond", .number(window.requestsPerSecond)),
                    ("proxyCPUPercent", .optional(window.proxyCPUShare.map { $0 * 100 })),
                    ("loadCPUBusyPercent", .optional(window.loadCPUShare.map { $0 * 100 })),
                    ("workerMicrosecondsPerRequest", .optional(window.workerMicrosecondsPerRequest)),
                    ("disturbanceCPUs", .number(window.disturbance)), ("errors", .integer(Int64(window.errors))),
                ])
            })),
            ("withoutChecks", .optional(checks.mean(checks: false))), ("withChecks", .optional(checks.mean(checks: true))),
            ("ratio", .optional(checks.ratio)),
            ("idle", .array(checks.idle.map { idle in
                .object([
                    ("kind", .string(idle.kind)), ("seconds", .number(idle.seconds)), ("checksPerSecond", .number(idle.checksPerSecond)),
                    ("proxyCPUPercent", .optional(idle.proxyShare.map { $0 * 100 })),
                    ("checkerThreadCPUPercent", .optional(idle.checkerShare.map { $0 * 100 })),
                    ("listenersCPUPercent", .optional(idle.listenersShare.map { $0 * 100 })),
                    ("checkerMicrosecondsPerCheck", .optional(idle.microsecondsPerCheck)),
                    ("busiestTenthSecondShare", .optional(idle.busiestTenthShare)),
                ])
            })),
            ("failures", .array(checks.failures.map { .string($0) })),
        ]
        return .object(members)
    }
}
