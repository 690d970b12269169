import BerthSystem

/// The hosts scenario's section of the report: one row per fault and proxy.
extension ScenarioReport {
    func hostsText(_ hosts: HostsResult) -> String {
        var out = "== hosts: failures as a network makes them (hosts in network namespaces)\n"
        if let skipped = hosts.skipped { return out + "skipped: \(skipped)\n\n" }
        out += """
            hosts etcd, client, a, b on one bridge (10.213.77.0/24); two whoami on each of a and b, registered by
            berth register --static --ttl 3s; in the client host berth discover and HAProxy with the same checks
            (tcp, inter 500 ms, fall 2, rise 2, timeout 1 s), connect timeout 1 s, one failed connect ejects
            (--observe-errors 1 / observe layer4 error-limit 1), retries 3 with redispatch; Berth also
            --retry-on empty-response,response-timeout --first-byte-timeout 1s. One sequential client per proxy,
            a new connection per request, 5 s limit; both proxies under the same fault at the same time.

            """
        let header = [pad("fault", 34), pad("proxy", 8), lead("requests", 9), lead("failed", 7), lead(">1 s", 6),
                      lead("p50 ms", 8), lead("p99 ms", 8), lead("max ms", 8), "  what happened"]
        out += header.joined() + "\n"
        for row in hosts.rows {
            out += [pad(row.fault, 34), pad(row.proxy, 8), lead(Format.grouped(UInt64(row.requests)), 9),
                    lead("\(row.failed)", 7), lead("\(row.slow)", 6), lead(Format.fixed(row.p50, 1), 8),
                    lead(Format.fixed(row.p99, 1), 8), lead(Format.fixed(row.maximum, 1), 8), "  \(row.detail)"].joined() + "\n"
        }
        for failure in hosts.failures { out += "note: \(failure)\n" }
        return out + "\n"
    }

    func hostsJSON(_ hosts: HostsResult) -> JSONValue {
        if let skipped = hosts.skipped { return .object([("skipped", .string(skipped))]) }
        return .object([
            ("rows", .array(hosts.rows.map { row in
                .object([
                    ("fault", .string(row.fault)), ("proxy", .string(row.proxy)), ("requests", .integer(Int64(row.requests))),
                    ("failed", .integer(Int64(row.failed))), ("overOneSecond", .integer(Int64(row.slow))),
                    ("p50Ms", .number(row.p50)), ("p99Ms", .number(row.p99)), ("maxMs", .number(row.maximum)),
                    ("detail", .string(row.detail)),
                ])
            })),
            ("failures", .array(hosts.failures.map { .string($0) })),
        ])
    }

    private func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
    }

    private func lead(_ text: String, _ width: Int) -> String {
        text.count >= width ? " " + text : String(repeating: " ", count: width - text.count) + text
    }
}
