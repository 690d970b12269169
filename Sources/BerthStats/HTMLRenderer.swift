import BerthEngine

/// `/`: a page in the spirit of HAProxy's stats page, readable without JavaScript: a header with
/// the process, discovery and registrar state, then one table per service (frontend row, one row
/// per backend coloured by status, the backend totals). `?refresh=N` adds a meta refresh. Pure.
enum HTMLRenderer {
    static func render(_ snapshot: StatsSnapshot, refresh: Int?) -> String {
        var page = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8">
            <title>Berth statistics</title>

            """
        if let refresh { page += "<meta http-equiv=\"refresh\" content=\"\(refresh)\">\n" }
        page += style + "</head><body>\n"
        page += header(snapshot, refresh: refresh)
        if snapshot.services.isEmpty { page += "<p class=\"empty\">No service yet.</p>\n" }
        for service in snapshot.services { page += table(service) }
        page += "</body></html>\n"
        return page
    }

    private static let style = """
        <style>
        body { font-family: Helvetica, Arial, sans-serif; font-size: 12px; margin: 10px; color: #000; background: #fff; }
        h1 { font-size: 18px; margin: 0 0 6px 0; color: #fff; background: #20408a; padding: 6px 10px; }
        h2 { font-size: 14px; margin: 16px 0 2px 0; }
        table.info { border-collapse: collapse; margin-bottom: 8px; }
        table.info td { padding: 1px 12px 1px 0; vertical-align: top; }
        table.info td.k { font-weight: bold; }
        table.svc { border-collapse: collapse; width: 100%; margin-bottom: 6px; }
        table.svc th, table.svc td { border: 1px solid #a0a0a0; padding: 2px 4px; text-align: right; white-space: nowrap; }
        table.svc th { background: #20408a; color: #fff; font-weight: normal; }
        table.svc th.group { background: #3060c0; }
        table.svc td.name, table.svc td.text { text-align: left; }
        tr.frontend td { background: #f0f0c0; }
        tr.backend td { background: #c0d0f0; font-weight: bold; }
        tr.up td { background: #c0ffc0; }
        tr.down td { background: #ff9090; }
        tr.drain td { background: #a0b4ff; }
        tr.maint td { background: #d8a060; }
        tr.nocheck td { background: #e8e8e8; }
        .legend span { display: inline-block; padding: 1px 6px; margin-right: 4px; border: 1px solid #a0a0a0; }
        .empty { font-style: italic; }
        </style>

        """

    private static func header(_ snapshot: StatsSnapshot, refresh: Int?) -> String {
        let process = snapshot.process
        var rows: [(String, String)] = [
            ("version", process.version), ("pid", String(process.pid)),
            ("uptime", duration(process.uptimeSeconds)), ("workers", String(process.workers)),
            ("open connections", grouped(UInt64(max(0, process.openConnections)))),
            ("table revision", String(process.tableRevision)),
            ("admin API", process.adminEnabled ? "enabled" : "off (start with --stats-auth)"),
            ("refresh", refresh.map { "every \($0) s" } ?? "off (add ?refresh=5)"),
        ]
        if let written = process.connectionLogWritten {
            rows.append(("connection log", "\(grouped(written)) written, \(grouped(process.connectionLogDropped ?? 0)) dropped"))
        }
        if let discovery = snapshot.discovery {
            rows += [
                ("etcd endpoint", discovery.endpoint),
                ("etcd connected", discovery.connected ? "yes" : "NO"),
                ("applied revision", String(discovery.appliedRevision)),
                ("last etcd event", discovery.secondsSinceLastEvent.map { duration($0) + " ago" } ?? "none yet"),
                ("skipped values", String(discovery.skippedValues)),
            ]
            if let source = discovery.source { rows.append(("table source", source)) }
            if let path = discovery.stateFile {
                rows.append(("state file", "\(path): \(discovery.stateFileWrites ?? 0) writes, \(discovery.stateFileFailures ?? 0) failed"))
            }
        } else {
            rows.append(("discovery", "off (static backends)"))
        }
        if let registrar = snapshot.registrar {
            rows += [
                ("registered containers", String(registrar.registeredContainers)),
                ("docker connected", registrar.dockerConnected ? "yes" : "NO"),
                ("lease", registrar.leaseID.map { String($0, radix: 16) + (registrar.leaseTTLSeconds.map { ", TTL \($0) s" } ?? "") } ?? "none"),
            ]
        } else {
            rows.append(("registered containers", "none (no registrar)"))
        }
        var html = "<h1>Berth statistics</h1>\n<table class=\"info\">\n"
        // Four key/value pairs per line keep the header short.
        var index = 0
        while index < rows.count {
            html += "<tr>"
            for pair in rows[index..<min(index + 4, rows.count)] {
                html += "<td class=\"k\">\(escape(pair.0))</td><td>\(escape(pair.1))</td>"
            }
            html += "</tr>\n"
            index += 4
        }
        html += "</table>\n<div class=\"legend\">"
        for (cls, text) in [("up", "UP"), ("down", "DOWN"), ("drain", "DRAIN (no new connections)"),
                            ("maint", "MAINT (maintenance, checks paused)"), ("nocheck", "no check")] {
            html += "<span class=\"\(cls)\" style=\"background: \(legendColor(cls))\">\(text)</span>"
        }
        html += "</div>\n"
        return html
    }

    private static func legendColor(_ cls: String) -> String {
        switch cls {
        case "up": "#c0ffc0"
        case "down": "#ff9090"
        case "drain": "#a0b4ff"
        case "maint": "#d8a060"
        default: "#e8e8e8"
        }
    }

    private static func table(_ service: ServiceStats) -> String {
        var html = "<h2>\(escape(service.name)) <small>listening on \(escape(service.listen)), \(escape(service.status))</small></h2>\n"
        html += "<table class=\"svc\">\n<tr><th class=\"group\"></th><th class=\"group\" colspan=\"5\">Server</th>"
        for group in trafficGroups {
            html += "<th class=\"group\" colspan=\"\(group.columns.count)\">\(group.name)</th>"
        }
        html += "</tr>\n<tr><th>Name</th><th>Status</th><th>Last check</th><th>Check time</th><th>Last change</th><th>Weight</th>"
        for group in trafficGroups {
            for column in group.columns { html += "<th>\(column.title)</th>" }
        }
        html += "</tr>\n"
        html += row(class: "frontend", name: "Frontend", status: "OPEN", check: nil, weight: "",
                    traffic: service.frontend, lastChange: "")
        for backend in service.backends {
            let cls = switch backend.status {
            case .up: "up"
            case .down: "down"
            case .drain: "drain"
            case .maint: "maint"
            case .noCheck: "nocheck"
            }
            html += row(class: cls, name: "\(backend.name) (\(backend.address))", status: backend.status.rawValue,
                        check: backend.check, weight: backend.weightText, traffic: backend.traffic,
                        lastChange: backend.check.map { duration($0.secondsSinceChange) } ?? "")
        }
        let weight = service.backends.filter { $0.status.takesTraffic }.reduce(0) { $0 + $1.weight }
        html += row(class: "backend", name: "Backend", status: service.status, check: nil, weight: String(weight),
                    traffic: service.totals, lastChange: "")
        html += "</table>\n"
        return html
    }

    private static func row(class cls: String, name: String, status: String, check: CheckStats?, weight: String,
                            traffic: TrafficStats, lastChange: String) -> String {
        let checkText = check.map { check in
            check.code == "INI" ? "INI" : "\(check.code) \(check.detail)"
        } ?? ""
        let checkTime = check?.durationMilliseconds.map { "\($0) ms" } ?? ""
        var cells: [(String, String)] = [
            ("name", name), ("text", status), ("text", checkText), ("", checkTime), ("", lastChange), ("", weight),
        ]
        for group in trafficGroups {
            for column in group.columns { cells.append(("", column.text(traffic))) }
        }
        var html = "<tr class=\"\(cls)\">"
        for (cellClass, text) in cells {
            html += cellClass.isEmpty ? "<td>" : "<td class=\"\(cellClass)\">"
            html += escape(text) + "</td>"
        }
        return html + "</tr>\n"
    }

    /// One column of the traffic part of a row.
    private struct TrafficColumn: Sendable {
        let title: String
        let text: @Sendable (TrafficStats) -> String
    }

    /// The traffic columns by group: the counters of the engine's table that name an HTML group,
    /// in table order, after the session gauges and before the session rates.
    private static let trafficGroups: [(name: String, columns: [TrafficColumn])] = {
        func counters(_ group: String) -> [TrafficColumn] {
            TrafficCounter.all.compactMap { counter -> TrafficColumn? in
                guard let html = counter.html, html.group == group else { return nil }
                return TrafficColumn(title: html.title) { grouped($0.counts[counter]) }
            }
        }
        let gauges = [
            TrafficColumn(title: "Cur") { String($0.currentSessions) },
            TrafficColumn(title: "Max") { String($0.maxSessions) },
        ]
        let rates = [
            TrafficColumn(title: "Rate") { rate($0.sessionRate) },
            TrafficColumn(title: "Rate max") { rate($0.sessionRateMax) },
            TrafficColumn(title: "Last") { $0.lastSessionSeconds.map(duration) ?? "" },
        ]
        var groups = [(name: "Sessions", columns: gauges + counters("Sessions") + rates)]
        var named = ["Sessions"]
        for counter in TrafficCounter.all {
            guard let group = counter.html?.group, !named.contains(group) else { continue }
            named.append(group)
            groups.append((name: group, columns: counters(group)))
        }
        return groups
    }()

    /// 0s, 42s, 3m5s, 2h3m, 4d2h: HAProxy's compact durations.
    static func duration(_ seconds: Double) -> String {
        let total = Int64(max(0, seconds).rounded(.down))
        let days = total / 86_400, hours = total / 3_600 % 24, minutes = total / 60 % 60, rest = total % 60
        if days > 0 { return "\(days)d\(hours)h" }
        if hours > 0 { return "\(hours)h\(minutes)m" }
        if minutes > 0 { return "\(minutes)m\(rest)s" }
        return "\(rest)s"
    }

    private static func rate(_ value: Double) -> String {
        value == value.rounded() ? String(Int64(value)) : String(value)
    }

    /// 1234567 → 1,234,567.
    static func grouped(_ value: UInt64) -> String {
        let digits = Array(String(value))
        var text = ""
        for (offset, digit) in digits.enumerated() {
            if offset > 0 && (digits.count - offset) % 3 == 0 { text.append(",") }
            text.append(digit)
        }
        return text
    }

    static func escape(_ text: String) -> String {
        text.escaped(["&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"])
    }
}

extension String {
    /// Each character found in `replacements` replaced by its text (the renderers' escaping).
    func escaped(_ replacements: [Character: String]) -> String {
        var result = ""
        for character in self {
            if let replacement = replacements[character] { result += replacement } else { result.append(character) }
        }
        return result
    }
}
