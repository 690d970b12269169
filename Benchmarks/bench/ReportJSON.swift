import BerthEngine
import BerthSystem
import Glibc

/// The run's figures as JSON (`--json`): the same values as the tables and notes.
extension Report {
    func json() -> String {
        let options = result.options
        var setups: [JSONValue] = []
        for row in result.setups {
            var members: [(String, JSONValue)] = [("name", .string(row.setup.name))]
            if let skipped = row.skipped {
                members.append(("skipped", .string(skipped)))
                setups.append(.object(members))
                continue
            }
            if row.setup.isProxy {
                members.append(("threads", .integer(Int64(row.setup.threads))))
                members.append(("cpus", .array(row.setup.proxyCPUs(result.proxyCPU).map { .integer(Int64($0)) })))
            }
            members.append(("cpuSeconds", .optional(row.cpuSeconds)))
            members.append(("peakRSSBytes", row.peakRSS.map { .integer(Int64($0)) } ?? .null))
            var phases: [(String, JSONValue)] = []
            for phase in options.phases {
                if let failure = row.failures[phase], row.phases[phase] == nil {
                    phases.append((phase.rawValue, .object([("failed", .string(failure))])))
                }
                if let reason = row.notMeasured[phase] {
                    phases.append((phase.rawValue, .object([("notMeasured", .string(reason))])))
                }
                guard let measurement = row.phases[phase] else { continue }
                var fields: [(String, JSONValue)] = [
                    ("value", .number(measurement.value)), ("unit", .string(measurement.unit)),
                    ("operations", .integer(Int64(measurement.operations))), ("errors", .integer(Int64(measurement.errors))),
                    ("seconds", .number(measurement.seconds)),
                    ("proxyCPUPercent", .optional(measurement.proxyCPUShare.map { $0 * 100 })),
                    ("proxyCPUCost", .optional(measurement.cost)), ("costUnit", .string(measurement.costUnit)),
                    ("cpuBusyPercent", .array(measurement.cpuBusy.map { .number($0 * 100) })),
                    ("otherProcessesCPUs", .number(measurement.foreignCPUs)),
                    ("stealPercent", .array(measurement.steal.map { .number($0 * 100) })),
                    ("capped", .bool(measurement.capped)), ("round", .integer(Int64(measurement.round))),
                ]
                if let error = measurement.lastError { fields.append(("lastError", .string(error))) }
                if let rate = measurement.rate { fields.append(("rate", .integer(Int64(rate)))) }
                if let latency = measurement.latency {
                    var percentiles: [(String, JSONValue)] = [
                        ("p50", .number(latency.p50)), ("p90", .number(latency.p90)), ("p99", .number(latency.p99)),
                        ("p99.9", .number(latency.p999)), ("max", .number(latency.max)),
                        ("samples", .integer(Int64(latency.samples))),
                    ]
                    // A closed loop sends as soon as it can: no send lag to report.
                    if phase.isOpenLoop {
                        percentiles += [("sendLagP99", .number(latency.sendLagP99)), ("sendLagMax", .number(latency.sendLagMax))]
                    }
                    fields.append(("latencyMicroseconds", .object(percentiles)))
                }
                phases.append((phase.rawValue, .object(fields)))
            }
            members.append(("phases", .object(phases)))
            setups.append(.object(members))
        }
        var ratios: [(String, JSONValue)] = []
        let columns = (throughputColumns + latencyTables.flatMap(\.columns) + resourceColumns + costColumns).filter(\.inRatios)
        if let headline, let direct = directRow {
            ratios.append(("\(headline.setup.name)/direct", .object(columns.compactMap { column in
                ratio(column.value(headline), column.value(direct)).map { (column.key, .number($0)) }
            })))
        }
        for berth in berthRows where haproxyRows.contains(where: { $0.setup.threads == berth.setup.threads }) {
            ratios.append(("\(berth.setup.name)/haproxy*", .object(columns.compactMap { column in
                ratio(column.value(berth), bestHAProxy(column, threads: berth.setup.threads)?.value).map { (column.key, .number($0)) }
            })))
        }
        let document = JSONValue.object([
            ("machine", .object([
                ("cpus", .integer(Int64(result.cpuCount))), ("cpuModel", .string(result.cpuModel)),
                ("kernel", .string(result.kernel)), ("proxyCPU", .integer(Int64(result.proxyCPU))),
                ("loadCPU", .integer(Int64(result.loadCPU))),
                ("busyPercentBeforeRun", .number(result.idleCheckBusy * 100)),
                ("haproxy", result.haproxyVersion.map { .string($0) } ?? .null),
            ])),
            ("settings", .object([
                ("phaseSeconds", .number(options.phaseSeconds)), ("warmupSeconds", .number(options.warmupSeconds)),
                ("keepAliveConnections", .integer(Int64(options.keepAliveConnections))),
                ("concurrentConnects", .integer(Int64(options.concurrentConnects))),
                ("bulkStreams", .integer(Int64(options.bulkStreams))), ("latencyRate", .integer(Int64(options.rate))),
                ("latencyConnections", .integer(Int64(options.latencyConnections))),
                ("latencyHighRate", .integer(Int64(BenchOptions.highRate))),
                ("loadedLatencyShare", .number(BenchOptions.loadedShare)),
                ("loadedLatencyConnections", .integer(Int64(options.loadedLatencyConnections))),
                ("crowdConnections", .integer(Int64(options.crowdConnections))),
                ("rounds", .integer(Int64(options.rounds))),
            ])),
            ("setups", .array(setups)),
            ("headline", headline.map { .string($0.setup.name) } ?? .null),
            ("ratios", .object(ratios)),
            ("scenarios", scenarioReport?.json() ?? .null),
            ("notes", .array(notes().map { .string($0) })),
        ])
        return document.rendered() + "\n"
    }
}
