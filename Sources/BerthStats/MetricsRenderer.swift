import BerthEngine

/// `/metrics`: the Prometheus text exposition format (0.0.4). Counters end in `_total`, times are
/// in seconds, every series of a family follows its one `# HELP` and `# TYPE` line (what
/// `promtool check metrics` asks). Labels: `service` on frontend families, `service` and
/// `backend` on backend families. Pure.
enum MetricsRenderer {
    /// One family: name, type, help, and its samples (labels, value).
    private struct Family {
        let name: String
        let type: String
        let help: String
        var samples: [(labels: [(String, String)], value: String)] = []

        init(_ name: String, _ type: String, _ help: String) {
            self.name = name
            self.type = type
            self.help = help
        }

        mutating func add(_ labels: [(String, String)], _ value: some Numeric & CustomStringConvertible) {
            samples.append((labels, value.description))
        }

        mutating func add(_ labels: [(String, String)], _ value: Double) {
            samples.append((labels, MetricsRenderer.number(value)))
        }
    }

    static func render(_ snapshot: StatsSnapshot) -> String {
        var families: [Family] = []
        let process = snapshot.process
        var info = Family("berth_build_info", "gauge", "Berth's version; always 1.")
        info.add([("version", process.version)], 1)
        families.append(info)
        families.append(single("berth_uptime_seconds", "gauge", "Seconds since the stats server started.", process.uptimeSeconds))
        families.append(single("berth_workers", "gauge", "Data-plane worker threads.", Double(process.workers)))
        families.append(single("berth_open_connections", "gauge", "Client connections open now, all services.", Double(process.openConnections)))
        families.append(single("berth_table_revision", "gauge", "Revision of the routing table served.", Double(process.tableRevision)))
        if let written = process.connectionLogWritten {
            families.append(single("berth_connection_log_records_total", "counter", "Connection log records written.", Double(written)))
            families.append(single("berth_connection_log_dropped_total", "counter",
                                   "Connection log records dropped: a worker's ring was full while the writer fell behind.",
                                   Double(process.connectionLogDropped ?? 0)))
        }
        families += trafficFamilies(prefix: "berth_frontend", what: "clients of the service",
                                    rows: snapshot.services.map { ([("service", $0.name)], $0.frontend) })
        var backendRows: [([(String, String)], TrafficStats)] = []
        var up = Family("berth_backend_up", "gauge", "1 when the backend takes new connections (UP or no check), else 0.")
        var status = Family("berth_backend_status", "gauge", "1 for the backend's current status (UP, DOWN, DRAIN, MAINT, no check).")
        var weight = Family("berth_backend_weight", "gauge", "Balancing weight in force (an operator's or the registry's).")
        var warmup = Family("berth_backend_warmup_ratio", "gauge", "Slow start: the part of its weight a backend has now (1: all).")
        var checkDuration = Family("berth_backend_check_duration_seconds", "gauge", "Duration of the last active check.")
        var checkUp = Family("berth_backend_check_success", "gauge", "1 when the last active check succeeded.")
        var checks = Family("berth_backend_checks_total", "counter", "Active checks run.")
        var ejections = Family("berth_backend_ejections_total", "counter", "Times passive observation took the backend down.")
        var allDown = Family("berth_service_all_down_total", "counter", "Times every backend of the service was down at once.")
        for service in snapshot.services {
            allDown.add([("service", service.name)], service.allDownEvents)
            for backend in service.backends {
                let labels = [("service", service.name), ("backend", backend.name)]
                backendRows.append((labels, backend.traffic))
                up.add(labels, backend.status.takesTraffic ? 1 : 0)
                status.add(labels + [("state", backend.status.rawValue)], 1)
                weight.add(labels, backend.weight)
                warmup.add(labels, Double(backend.warmupPercent ?? 100) / 100)
                if let check = backend.check, check.code != "INI" {
                    if let duration = check.durationMilliseconds { checkDuration.add(labels, Double(duration) / 1000) }
                    checkUp.add(labels, check.code.hasSuffix("OK") ? 1 : 0)
                }
                if let check = backend.check {
                    checks.add(labels, check.checksDone)
                    ejections.add(labels, check.ejections)
                }
            }
        }
        families += [up, status, weight, warmup, checkDuration, checkUp, checks, ejections, allDown]
        families += trafficFamilies(prefix: "berth_backend", what: "the backend", rows: backendRows)
        if let discovery = snapshot.discovery {
            families.append(single("berth_etcd_connected", "gauge", "1 while the etcd watch is established.", discovery.connected ? 1 : 0, labels: [("endpoint", discovery.endpoint)]))
            families.append(single("berth_etcd_applied_revision", "gauge", "etcd revision of the last routing table applied.", Double(discovery.appliedRevision)))
            families.append(single("berth_etcd_skipped_values_total", "counter", "Registry values that did not parse.", Double(discovery.skippedValues)))
            if let seconds = discovery.secondsSinceLastEvent {
                families.append(single("berth_etcd_seconds_since_last_event", "gauge", "Seconds since the last etcd watch event.", seconds))
            }
        }
        if let registrar = snapshot.registrar {
            families.append(single("berth_registrar_registered_containers", "gauge", "Containers registered in etcd now.", Double(registrar.registeredContainers)))
            families.append(single("berth_registrar_docker_connected", "gauge", "1 while the Docker event stream is connected.", registrar.dockerConnected ? 1 : 0))
            if let ttl = registrar.leaseTTLSeconds {
                families.append(single("berth_registrar_lease_ttl_seconds", "gauge", "TTL of the registrar's etcd lease.", Double(ttl)))
            }
            if let seconds = registrar.secondsSinceKeepAlive {
                families.append(single("berth_registrar_seconds_since_keepalive", "gauge", "Seconds since the lease was last kept alive.", seconds))
            }
        }
        var output = ""
        for family in families where !family.samples.isEmpty {
            output += "# HELP \(family.name) \(family.help)\n# TYPE \(family.name) \(family.type)\n"
            for sample in family.samples {
                output += family.name
                if !sample.labels.isEmpty {
                    output += "{" + sample.labels.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "}"
                }
                output += " \(sample.value)\n"
            }
        }
        return output
    }

    /// The session and byte families of frontend or backend rows.
    private static func trafficFamilies(prefix: String, what: String, rows: [([(String, String)], TrafficStats)]) -> [Family] {
        var current = Family("\(prefix)_current_sessions", "gauge", "Sessions open now to \(what).")
        var highest = Family("\(prefix)_max_sessions", "gauge", "Most sessions open at once to \(what) (summed over workers).")
        var rate = Family("\(prefix)_session_rate", "gauge", "New sessions per second with \(what), over the last second.")
        var lastSession = Family("\(prefix)_last_session_seconds", "gauge", "Seconds since the last session started with \(what).")
        // One family per counter of the engine's table.
        let exported = TrafficCounter.all.compactMap { counter in counter.metric.map { (counter, $0) } }
        var counters = exported.map { counter, metric in
            Family("\(prefix)_\(metric)", "counter", counter.help.replacing("{what}", with: what))
        }
        for (labels, traffic) in rows {
            current.add(labels, traffic.currentSessions)
            highest.add(labels, traffic.maxSessions)
            rate.add(labels, traffic.sessionRate)
            if let seconds = traffic.lastSessionSeconds { lastSession.add(labels, seconds) }
            for (index, (counter, _)) in exported.enumerated() { counters[index].add(labels, traffic.counts[counter]) }
        }
        return [current, highest, rate] + counters + [lastSession]
    }

    private static func single(_ name: String, _ type: String, _ help: String, _ value: Double,
                               labels: [(String, String)] = []) -> Family {
        var family = Family(name, type, help)
        family.add(labels, value)
        return family
    }

    /// Shortest exact text for a sample value (integers without a fraction).
    static func number(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(value)
    }

    /// Label values escape backslash, double quote and line feed.
    static func escape(_ value: String) -> String {
        value.escaped(["\\": "\\\\", "\"": "\\\"", "\n": "\\n"])
    }
}
