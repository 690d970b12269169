import BerthEngine

/// `/;csv`: HAProxy 2.6's CSV (`show stat`), so that exporters, dashboards and scripts written
/// for HAProxy read Berth unchanged. Same header line (`# ` then the names, and a trailing comma
/// on every line), same column order, one FRONTEND row, one row per server and one BACKEND row per
/// service. Columns whose meaning Berth shares are filled; the others (HTTP, queue, compression,
/// agent, timing columns, and the extra statistics modules HAProxy appends after `-`) are empty
/// or left out. Pure.
enum CSVRenderer {
    /// HAProxy 2.6's standard columns, in order (`ST_F_*` up to `agg_check_status`).
    static let columns = [
        "pxname", "svname", "qcur", "qmax", "scur", "smax", "slim", "stot", "bin", "bout",
        "dreq", "dresp", "ereq", "econ", "eresp", "wretr", "wredis", "status", "weight", "act",
        "bck", "chkfail", "chkdown", "lastchg", "downtime", "qlimit", "pid", "iid", "sid", "throttle",
        "lbtot", "tracked", "type", "rate", "rate_lim", "rate_max", "check_status", "check_code", "check_duration", "hrsp_1xx",
        "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other", "hanafail", "req_rate", "req_rate_max", "req_tot", "cli_abrt",
        "srv_abrt", "comp_in", "comp_out", "comp_byp", "comp_rsp", "lastsess", "last_chk", "last_agt", "qtime", "ctime",
        "rtime", "ttime", "agent_status", "agent_code", "agent_duration", "check_desc", "agent_desc", "check_rise", "check_fall", "check_health",
        "agent_rise", "agent_fall", "agent_health", "addr", "cookie", "mode", "algo", "conn_rate", "conn_rate_max", "conn_tot",
        "intercepted", "dcon", "dses", "wrew", "connect", "reuse", "cache_lookups", "cache_hits", "srv_icur", "src_ilim",
        "qtime_max", "ctime_max", "rtime_max", "ttime_max", "eint", "idle_conn_cur", "safe_conn_cur", "used_conn_cur", "need_conn_est", "uweight",
        "agg_server_status", "agg_server_check_status", "agg_check_status",
    ]

    private static let index: [String: Int] = Dictionary(uniqueKeysWithValues: columns.enumerated().map { ($1, $0) })

    static var header: String { "# " + columns.joined(separator: ",") + ",\n" }

    static func render(_ snapshot: StatsSnapshot) -> String {
        var output = header
        for (serviceIndex, service) in snapshot.services.enumerated() {
            let proxyID = String(serviceIndex + 1)
            output += line(frontendRow(service, proxyID: proxyID))
            for (serverIndex, backend) in service.backends.enumerated() {
                output += line(serverRow(service, backend, proxyID: proxyID, serverID: serverIndex + 1))
            }
            output += line(backendRow(service, proxyID: proxyID))
        }
        return output
    }

    /// Columns every row shares: names, session and byte counters, process and proxy ids.
    private static func common(_ service: ServiceStats, _ name: String, _ traffic: TrafficStats,
                               proxyID: String, serverID: Int, type: Int) -> [String: String] {
        var row = [
            "pxname": service.name, "svname": name,
            "scur": String(traffic.currentSessions), "smax": String(traffic.maxSessions),
            "pid": "1", "iid": proxyID, "sid": String(serverID), "type": String(type),
            "rate": whole(traffic.sessionRate), "rate_max": whole(traffic.sessionRateMax), "mode": "tcp",
        ]
        // The counters' columns come from the engine's table (type 0 is a FRONTEND row).
        for counter in TrafficCounter.all {
            guard let column = counter.csvColumn, type != 0 || counter.csvOnFrontend else { continue }
            row[column] = String(traffic.counts[counter])
        }
        return row
    }

    private static func frontendRow(_ service: ServiceStats, proxyID: String) -> [String: String] {
        var row = common(service, "FRONTEND", service.frontend, proxyID: proxyID, serverID: 0, type: 0)
        row["dreq"] = "0"
        row["dresp"] = "0"
        row["ereq"] = "0"
        row["status"] = "OPEN"
        row["conn_rate"] = row["rate"]
        row["conn_rate_max"] = row["rate_max"]
        row["conn_tot"] = row["stot"]
        return row
    }

    private static func serverRow(_ service: ServiceStats, _ backend: BackendStats, proxyID: String, serverID: Int) -> [String: String] {
        var row = common(service, backend.name, backend.traffic, proxyID: proxyID, serverID: serverID, type: 2)
        let traffic = backend.traffic
        row["qcur"] = "0"
        row["qmax"] = "0"
        row["dresp"] = "0"
        row["eresp"] = "0"
        row["status"] = backend.status.rawValue
        // HAProxy's weight is the effective one (slow start included), uweight the user's.
        row["weight"] = String(backend.warmupPercent.map { max(1, backend.weight * $0 / 100) } ?? backend.weight)
        row["uweight"] = String(backend.weight)
        row["act"] = "1"
        row["bck"] = "0"
        row["lbtot"] = String(traffic.totalSessions &+ traffic.connectErrors)
        row["lastsess"] = traffic.lastSessionSeconds.map { whole($0) } ?? "-1"
        row["addr"] = backend.address
        if let check = backend.check {
            row["chkdown"] = String(check.ejections)
            row["lastchg"] = whole(check.secondsSinceChange)
            row["check_status"] = check.code
            row["check_code"] = check.httpStatus.map(String.init) ?? ""
            row["check_duration"] = check.durationMilliseconds.map(String.init) ?? ""
            row["last_chk"] = check.code == "INI" ? "" : check.detail
            row["check_desc"] = description(check.code)
            row["check_rise"] = String(check.rise)
            row["check_fall"] = String(check.fall)
            row["check_health"] = String(health(check, up: backend.status != .down))
        }
        return row
    }

    private static func backendRow(_ service: ServiceStats, proxyID: String) -> [String: String] {
        var row = common(service, "BACKEND", service.totals, proxyID: proxyID, serverID: 0, type: 1)
        let taking = service.backends.filter { $0.status.takesTraffic }
        row["qcur"] = "0"
        row["qmax"] = "0"
        row["dreq"] = "0"
        row["dresp"] = "0"
        row["eresp"] = "0"
        row["status"] = service.status
        row["weight"] = String(taking.reduce(0) { $0 + $1.weight })
        row["uweight"] = row["weight"]
        row["act"] = String(taking.count)
        row["bck"] = "0"
        row["chkdown"] = String(service.allDownEvents)
        row["lbtot"] = String(service.totals.totalSessions &+ service.totals.connectErrors)
        row["lastsess"] = service.totals.lastSessionSeconds.map { whole($0) } ?? "-1"
        row["algo"] = "roundrobin"
        return row
    }

    /// HAProxy's health counter: 0 ..< rise (going up) or rise ..< rise + fall (up).
    private static func health(_ check: CheckStats, up: Bool) -> Int {
        if up { return check.rise + check.fall - 1 - min(check.consecutiveFailures, check.fall - 1) }
        return min(check.consecutiveSuccesses, max(0, check.rise - 1))
    }

    /// HAProxy's `check_desc` for each code.
    static func description(_ code: String) -> String {
        switch code {
        case "INI": "Initializing"
        case "L4OK": "Layer4 check passed"
        case "L4CON": "Layer4 connection problem"
        case "L4TOUT": "Layer4 timeout"
        case "L6OK": "Layer6 check passed"
        case "L6RSP": "Layer6 invalid response"
        case "L6TOUT": "Layer6 timeout"
        case "L7OK": "Layer7 check passed"
        case "L7STS": "Layer7 wrong status"
        case "L7RSP": "Layer7 invalid response"
        case "L7TOUT": "Layer7 timeout"
        default: ""
        }
    }

    private static func whole(_ value: Double) -> String { String(Int64(value.rounded(.down))) }

    private static func line(_ row: [String: String]) -> String {
        var fields = Array(repeating: "", count: columns.count)
        for (name, value) in row {
            guard let position = index[name] else { continue }
            fields[position] = escape(value)
        }
        return fields.joined(separator: ",") + ",\n"
    }

    /// HAProxy's `csv_enc`: a field with a comma, quote or line break is quoted, quotes doubled.
    static func escape(_ field: String) -> String {
        guard field.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" }) else { return field }
        return "\"" + field.escaped(["\"": "\"\""]) + "\""
    }
}
