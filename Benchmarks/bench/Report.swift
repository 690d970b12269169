import BerthEngine
import BerthSystem
import Glibc

/// The tables, ratios and notes printed at the end of a run (or the same figures as JSON).
///
/// Ratios divide a Berth row by the direct row, or by `haproxy*`: per column, the better of the
/// HAProxy rows (higher throughput, lower latency, CPU and memory). Which Berth row is the
/// headline is decided by the numbers (`chooseHeadline`).
struct Report {
    /// One figure per setup in a table.
    struct Column {
        /// The column's name in the JSON ratios.
        var key: String
        var header: String
        var unit: String
        var higherIsBetter: Bool
        var phase: Phase?
        var value: (SetupResult) -> Double?
        var format: (Double) -> String
        /// Shown in the ratio rows (not for context columns such as the sample count).
        var inRatios = true
    }

    let result: RunResult
    /// The Berth row used against direct, and why.
    let headline: SetupResult?
    let headlineReason: String
    static let labelWidth = 30
    static let columnWidth = 11
    /// Below this share of its core, the proxy was not what limited a throughput row.
    static let bottleneckShare = 0.8
    /// At or above this busy share, the load CPU was what limited it.
    static let saturatedShare = 0.9
    /// Other processes' CPU use in a phase above which the figure is flagged as disturbed.
    static let disturbanceCPUs = 0.1
    /// Steal share of any CPU above which a phase is flagged.
    static let disturbingSteal = 0.02

    init(_ result: RunResult) {
        self.result = result
        (headline, headlineReason) = Report.chooseHeadline(result)
    }

    var ran: [SetupResult] { result.setups.filter { $0.skipped == nil } }
    var scenarioReport: ScenarioReport? {
        result.scenarios.map { ScenarioReport(results: $0, options: result.options, proxyCPU: result.proxyCPU, loadCPU: result.loadCPU) }
    }
    var berthRows: [SetupResult] { ran.filter { $0.setup.isBerth } }
    var haproxyRows: [SetupResult] { ran.filter { $0.setup.isHAProxy } }
    var directRow: SetupResult? { ran.first { $0.setup == .direct } }

    /// The engine's default relay mode, unless another mode is faster by more than 3% over the
    /// throughput columns (geometric mean of its ratios to the default).
    static func chooseHeadline(_ result: RunResult) -> (SetupResult?, String) {
        let berth = result.setups.filter { $0.setup.isBerth && $0.setup.threads == 1 && $0.skipped == nil }
        let defaultMode = EngineConfiguration().relay
        guard let standard = berth.first(where: { $0.setup == .berth(defaultMode) }) else {
            return (berth.first, berth.isEmpty ? "" : "the only Berth mode measured")
        }
        let phases = result.options.phases.filter(\.isThroughput)
        var best = standard
        var bestMean = 1.0
        for candidate in berth where candidate.setup != standard.setup {
            var logSum = 0.0
            var count = 0
            for phase in phases {
                guard let mine = candidate.phases[phase]?.value, let theirs = standard.phases[phase]?.value,
                      mine > 0, theirs > 0 else { continue }
                logSum += log(mine / theirs)
                count += 1
            }
            let mean = count > 0 ? exp(logSum / Double(count)) : 0
            if mean > bestMean {
                best = candidate
                bestMean = mean
            }
        }
        if bestMean > 1.03 {
            return (best, "faster than the default (\(defaultMode.rawValue)) by \(Format.fixed((bestMean - 1) * 100, 0))% on average over the throughput columns")
        }
        return (standard, "the engine's default; no other mode was more than 3% faster on average over the throughput columns")
    }

    // MARK: Columns

    var throughputColumns: [Column] {
        let phases = result.options.phases.filter(\.isThroughput)
        return phases.map { phase in
            let (header, unit): (String, String) = switch phase {
            case .keepAlive: ("keep-alive", "req/s")
            case .newConnections: ("new conn", "conn/s")
            case .bulkSingle: ("bulk 1", "Gbit/s")
            case .bulkMulti: ("bulk \(result.options.bulkStreams)", "Gbit/s")
            case .keepAliveCrowd: ("ka \(Format.grouped(UInt64(result.options.crowdConnections)))", "req/s")
            case .latency, .latencyHigh, .latencyLoaded: ("", "")
            }
            return Column(key: phase.rawValue, header: header, unit: unit, higherIsBetter: true, phase: phase,
                          value: { $0.phases[phase]?.value },
                          format: unit == "Gbit/s" ? { Format.fixed($0, 2) } : { Format.rate($0) })
        }
    }

    /// The response-time columns of one phase that records them (keys `latency.p50` for the
    /// latency phase, `latency-20k.p50` and so on for the others).
    func latencyColumns(_ phase: Phase) -> [Column] {
        guard result.options.phases.contains(phase), phase.recordsLatency else { return [] }
        let micro: (Double) -> String = { Format.fixed($0, 1) }
        let prefix = phase == .latency ? "latency" : phase.rawValue
        let pick: [(String, (LatencySummary) -> Double)] = [
            ("p50", \.p50), ("p90", \.p90), ("p99", \.p99), ("p99.9", \.p999), ("max", \.max),
        ]
        var columns = pick.map { name, field in
            Column(key: "\(prefix).\(name)", header: name, unit: "us", higherIsBetter: false, phase: phase,
                   value: { $0.phases[phase]?.latency.map(field) }, format: micro)
        }
        columns.append(Column(key: "\(prefix).samples", header: "samples", unit: "", higherIsBetter: true, phase: phase,
                              value: { $0.phases[phase]?.latency.map { Double($0.samples) } }, format: { Format.rate($0) },
                              inRatios: false))
        if phase.isOpenLoop {
            columns.append(Column(key: "\(prefix).sendLagP99", header: "gen lag", unit: "p99 us", higherIsBetter: false, phase: phase,
                                  value: { $0.phases[phase]?.latency?.sendLagP99 }, format: micro, inRatios: false))
        }
        if phase == .latencyLoaded {
            columns.append(Column(key: "\(prefix).rate", header: "rate", unit: "req/s", higherIsBetter: true, phase: phase,
                                  value: { $0.phases[phase]?.rate.map(Double.init) }, format: { Format.rate($0) }, inRatios: false))
        }
        return columns
    }

    /// Every latency table: its title and columns.
    var latencyTables: [(title: String, columns: [Column])] {
        let options = result.options
        let titles: [(Phase, String)] = [
            (.latency, "Latency at \(Format.grouped(UInt64(options.rate))) req/s"),
            (.latencyHigh, "Latency at \(Format.grouped(UInt64(BenchOptions.highRate))) req/s"),
            (.latencyLoaded, "Latency at \(Format.fixed(BenchOptions.loadedShare * 100, 0))% of each setup's keep-alive saturation (rate per row)"),
            (.keepAliveCrowd, "Latency over \(Format.grouped(UInt64(options.crowdConnections))) keep-alive connections, closed loop"),
        ]
        return titles.compactMap { phase, title in
            let columns = latencyColumns(phase)
            return columns.isEmpty ? nil : (title + ", microseconds (lower is better)", columns)
        }
    }

    /// The latency phase's columns (the notes and the JSON ratios start from them).
    var latencyColumns: [Column] { latencyColumns(.latency) }

    var resourceColumns: [Column] {
        var columns = [
            Column(key: "cpuSeconds", header: "CPU", unit: "s", higherIsBetter: false, phase: nil,
                   value: \.cpuSeconds, format: { Format.fixed($0, 2) }),
            Column(key: "peakRSS", header: "peak RSS", unit: "MiB", higherIsBetter: false, phase: nil,
                   value: { $0.peakRSS.map { Double($0) / 1_048_576 } }, format: { Format.fixed($0, 1) }),
        ]
        for phase in result.options.phases {
            columns.append(Column(key: "cpuPercent.\(phase.rawValue)", header: phase.shortName, unit: "CPU %", higherIsBetter: false,
                                  phase: phase, value: { $0.phases[phase]?.proxyCPUShare.map { $0 * 100 } },
                                  format: { Format.fixed($0, 0) }))
        }
        return columns
    }

    var costColumns: [Column] {
        result.options.phases.map { phase in
            Column(key: "cost.\(phase.rawValue)", header: phase.shortName, unit: phase.costUnit, higherIsBetter: false, phase: phase,
                   value: { $0.phases[phase]?.cost }, format: { Format.fixed($0, phase.costUnit == "ms/GB" ? 1 : 2) })
        }
    }

    /// Per column, the better of the HAProxy rows with `threads` threads.
    func bestHAProxy(_ column: Column, threads: Int = 1) -> (value: Double, setup: Setup)? {
        var best: (value: Double, setup: Setup)?
        for row in haproxyRows where row.setup.threads == threads {
            guard let value = column.value(row) else { continue }
            if let current = best, column.higherIsBetter ? value <= current.value : value >= current.value { continue }
            best = (value, row.setup)
        }
        return best
    }

    // MARK: Text

    func text() -> String {
        let options = result.options
        var out = "Berth benchmark: \(result.cpuCount) CPUs (\(result.cpuModel)), Linux \(result.kernel)\n"
        out += "proxy on CPU \(result.proxyCPU) (1 worker / nbthread 1); load generator and backends on CPU \(result.loadCPU); "
        out += "\(Format.fixed(options.phaseSeconds, 1)) s per phase after \(Format.fixed(options.warmupSeconds, 1)) s warm-up\n"
        let shared = options.setups.filter { $0.threads > 1 }
        if let first = shared.first {
            out += shared.map(\.label).joined(separator: ", ") + ": \(first.threads) threads on CPUs "
                + "\(first.proxyCPUList(result.proxyCPU)), shared with the load generator and backends\n"
        }
        out += workloadText()
        if let version = result.haproxyVersion { out += "\(version)\n" }
        if let headline {
            out += "ratios: \(headline.setup.label) / direct, and each Berth row / haproxy* (per column, the better HAProxy row "
            out += "with as many threads); "
            out += ">1 means more (better for throughput, worse for latency, CPU, memory)\n"
        }
        out += "\n"
        let throughput = throughputColumns
        if !throughput.isEmpty { out += table("Throughput (higher is better)", throughput, rows: result.setups, withDirect: true) }
        for (title, columns) in latencyTables {
            out += table(title, columns, rows: result.setups, withDirect: true)
        }
        let proxies = result.setups.filter { $0.setup.isProxy }
        if !proxies.isEmpty {
            out += table("Proxy process: CPU seconds and peak RSS over the setup, CPU % of its core per phase", resourceColumns,
                         rows: proxies, withDirect: false)
            out += table("Proxy CPU per unit of work (lower is better)", costColumns, rows: proxies, withDirect: false)
        }
        if let scenarios = scenarioReport { out += scenarios.text() }
        out += "Notes\n"
        for note in notes() { out += "- \(note)\n" }
        return out
    }

    /// The load of each phase that runs, in two lines under the title (empty when no phase runs).
    func workloadText() -> String {
        let options = result.options
        let phases = Set(options.phases)
        guard !phases.isEmpty else { return "" }
        var out = "keep-alive: \(options.keepAliveConnections) connections; new connections: \(options.concurrentConnects) in flight; "
        out += "bulk: 1 and \(options.bulkStreams) streams; latency: \(Format.grouped(UInt64(options.rate))) req/s open loop over \(options.latencyConnections) connections\n"
        var more: [String] = []
        if phases.contains(.latencyHigh) {
            more.append("latency-20k: \(Format.grouped(UInt64(BenchOptions.highRate))) req/s over \(options.loadedLatencyConnections) connections")
        }
        if phases.contains(.latencyLoaded) {
            more.append("latency-80: \(Format.fixed(BenchOptions.loadedShare * 100, 0))% of the row's keep-alive req/s "
                + "over \(options.loadedLatencyConnections) connections (rate per row)")
        }
        if phases.contains(.keepAliveCrowd) {
            more.append("keepalive-1000: \(Format.grouped(UInt64(options.crowdConnections))) connections, closed loop")
        }
        return more.isEmpty ? out : out + more.joined(separator: "; ") + "\n"
    }

    func table(_ title: String, _ columns: [Column], rows: [SetupResult], withDirect: Bool) -> String {
        let width = Self.columnWidth
        var out = title + "\n"
        out += Format.pad("", Self.labelWidth, alignRight: false) + columns.map { Format.pad($0.header, width) }.joined() + "\n"
        out += Format.pad("", Self.labelWidth, alignRight: false) + columns.map { Format.pad($0.unit, width) }.joined() + "\n"
        for row in rows {
            out += Format.pad(row.setup.label, Self.labelWidth, alignRight: false)
            if let skipped = row.skipped {
                out += "  skipped: \(skipped)\n"
                continue
            }
            out += columns.map { column in
                if let value = column.value(row) { return Format.pad(column.format(value), width) }
                if let phase = column.phase, row.failures[phase] != nil, row.notMeasured[phase] == nil { return Format.pad("failed", width) }
                return Format.pad("-", width)
            }.joined() + "\n"
        }
        var ratioRows: [(String, [Double?])] = []
        if withDirect, let headline, let direct = directRow {
            ratioRows.append(("\(headline.setup.label) / direct", columns.map { column in
                column.inRatios ? ratio(column.value(headline), column.value(direct)) : nil
            }))
        }
        for berth in berthRows where haproxyRows.contains(where: { $0.setup.threads == berth.setup.threads }) {
            ratioRows.append(("\(berth.setup.label) / haproxy*", columns.map { column in
                column.inRatios ? ratio(column.value(berth), bestHAProxy(column, threads: berth.setup.threads)?.value) : nil
            }))
        }
        for (label, ratios) in ratioRows {
            out += Format.pad(label, Self.labelWidth, alignRight: false) + ratios.map { Format.pad(Format.ratio($0), width) }.joined() + "\n"
        }
        return out + "\n"
    }

    func ratio(_ numerator: Double?, _ denominator: Double?) -> Double? {
        guard let numerator, let denominator, denominator > 0 else { return nil }
        return numerator / denominator
    }
}
