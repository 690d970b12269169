/// The notes under the tables: failures, errors, bottlenecks, disturbance, the headline's
/// reason, the relay modes and HAProxy rows in order.
extension Report {
    /// Every note, in the order they are printed (and listed in the JSON).
    func notes() -> [String] {
        var notes = result.notes
        for row in result.setups {
            // A missing HAProxy is one run-level note, not one per row.
            if let skipped = row.skipped, skipped != BenchmarkRunner.haproxyMissing {
                notes.append("\(row.setup.label): skipped: \(skipped)")
            }
            for (phase, reason) in row.notMeasured.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                notes.append("\(row.setup.label) \(phase.rawValue): not measured: \(reason)")
            }
            for phase in result.options.phases {
                if let failure = row.failures[phase] { notes.append("\(row.setup.label) \(phase.rawValue): failed: \(failure)") }
                if let measurement = row.phases[phase] {
                    if measurement.errors > 0 {
                        notes.append("\(row.setup.label) \(phase.rawValue): \(measurement.errors) errors (last: \(measurement.lastError ?? "?"))")
                    }
                    if measurement.capped { notes.append("\(row.setup.label) \(phase.rawValue): stopped at the operation cap before the end of the window") }
                }
            }
        }
        if ran.contains(where: { $0.setup.threads == 2 }) {
            notes.append("the two-thread rows (berth default: berth proxy with two workers, its stats server and TCP checks; "
                + "haproxy nbthread 2 with a stats listener and checks) run on both CPUs, shared with the load generator "
                + "and backends; their CPU % is of one core (up to 200%); each is compared with the other only")
        }
        notes += bottleneckNotes()
        notes += disturbanceNotes()
        if let headline { notes.append("headline Berth row: \(headline.setup.label): \(headlineReason)") }
        notes += relayModeNotes()
        notes += haproxyNotes()
        notes += scenarioReport?.notes() ?? []
        let lags = ran.compactMap { $0.phases[.latency]?.latency }
        if let worst = lags.max(by: { $0.sendLagP99 < $1.sendLagP99 }) {
            notes.append("latency phase: the load generator sent on-time requests at most \(Format.fixed(worst.sendLagP99, 1)) us late at p99 "
                + "(max \(Format.fixed(lags.map(\.sendLagMax).max() ?? 0, 1)) us); response times count from the actual send, "
                + "or from the due time when a request had to wait for a free connection")
        }
        return notes
    }

    /// Where the proxy used well under its core in a throughput phase, the limit was elsewhere.
    func bottleneckNotes() -> [String] {
        var notes: [String] = []
        let loadCPU = result.loadCPU
        for row in ran where row.setup.isProxy && row.setup.threads == 1 {
            var loadBound: [String] = []
            var neither: [String] = []
            var proxyBound: [String] = []
            for phase in result.options.phases where phase.isThroughput {
                guard let measurement = row.phases[phase], let share = measurement.proxyCPUShare else { continue }
                let load = measurement.cpuBusy.count > loadCPU ? measurement.cpuBusy[loadCPU] : 0
                let figures = "\(phase.rawValue) (proxy \(Format.fixed(share * 100, 0))%, CPU \(loadCPU) \(Format.fixed(load * 100, 0))%)"
                if share >= Self.bottleneckShare {
                    proxyBound.append(figures)
                } else if load >= Self.saturatedShare {
                    loadBound.append(figures)
                } else {
                    neither.append(figures)
                }
            }
            let threshold = Format.fixed(Self.bottleneckShare * 100, 0)
            notes += listNote("\(row.setup.label): the proxy used under \(threshold)% of its core in ", loadBound,
                              ": the load generator and backends (CPU \(loadCPU)) were the bottleneck for those figures")
            notes += listNote("\(row.setup.label): no CPU saturated in ", neither,
                              ": those figures were bound by round trips between the CPUs (wake-ups), or disturbed by other processes")
            notes += listNote("\(row.setup.label): proxy-bound (its core at least \(threshold)% busy) in ", proxyBound)
        }
        return notes
    }

    /// Phases during which other processes, or the hypervisor, took a noticeable share of the
    /// machine.
    func disturbanceNotes() -> [String] {
        var busy: [String] = []
        var stolen: [String] = []
        for row in ran {
            for phase in result.options.phases {
                guard let measurement = row.phases[phase] else { continue }
                if measurement.foreignCPUs >= Self.disturbanceCPUs {
                    busy.append("\(row.setup.label) \(phase.rawValue) (\(Format.fixed(measurement.foreignCPUs, 2)))")
                }
                if measurement.steal.contains(where: { $0 >= Self.disturbingSteal }) {
                    stolen.append("\(row.setup.label) \(phase.rawValue) ("
                        + measurement.steal.map { Format.fixed($0 * 100, 0) + "%" }.joined(separator: "/") + ")")
                }
            }
        }
        return listNote("other processes used CPU time (in CPUs) during ", busy,
                        ": those figures are disturbed; rerun on a quieter machine (or with --repeat) to confirm them")
            + listNote("the hypervisor stole time from the CPUs (steal per CPU) during ", stolen,
                       ": latency tails and the load generator's lateness follow steal")
    }

    /// One note, `head` + `items` (comma-separated) + `tail`, or none when `items` is empty.
    func listNote(_ head: String, _ items: [String], _ tail: String = "") -> [String] {
        items.isEmpty ? [] : [head + items.joined(separator: ", ") + tail]
    }

    /// Which relay mode was fastest, per throughput column and for the latency median.
    func relayModeNotes() -> [String] {
        let modes = berthRows.filter { $0.setup.threads == 1 }
        guard modes.count > 1 else { return [] }
        var notes: [String] = []
        for column in throughputColumns + latencyColumns.prefix(1) {
            let values = modes.compactMap { row in column.value(row).map { (row.setup, $0) } }
            guard values.count > 1 else { continue }
            let sorted = values.sorted { column.higherIsBetter ? $0.1 > $1.1 : $0.1 < $1.1 }
            let ordering = sorted.map { "\($0.0.label.replacingBerthPrefix) \(column.format($0.1))" }
                .joined(separator: column.higherIsBetter ? " > " : " < ")
            let name = column.phase == .latency ? "latency \(column.header)" : column.header
            notes.append("relay modes, \(name): \(ordering) \(column.unit)")
        }
        return notes
    }

    /// Which one-thread HAProxy setup was better, per column.
    func haproxyNotes() -> [String] {
        // haproxy* of the one-thread rows only (the two-thread row is compared with berth default alone).
        guard haproxyRows.filter({ $0.setup.threads == 1 }).count > 1 else { return [] }
        var winners: [Setup: [String]] = [:]
        for column in throughputColumns + latencyColumns.prefix(3) {
            guard let best = bestHAProxy(column) else { continue }
            winners[best.setup, default: []].append(column.phase == .latency ? "latency \(column.header)" : column.header)
        }
        return haproxyRows.compactMap { row in
            guard let columns = winners[row.setup] else { return nil }
            return "haproxy*: \(row.setup.label) was the better HAProxy for " + columns.joined(separator: ", ")
        }
    }
}

private extension String {
    /// "berth splice" → "splice", for the relay-mode notes.
    var replacingBerthPrefix: String { hasPrefix("berth ") ? String(dropFirst(6)) : self }
}
