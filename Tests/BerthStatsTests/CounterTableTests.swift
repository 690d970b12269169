@testable import BerthEngine
import BerthHealth
@testable import BerthStats
import FoundationEssentials
import XCTest

/// The engine's table of traffic counters drives every renderer: each counter, with a value of
/// its own, shows up under its own name in the JSON, the metrics, the CSV and on the page.
final class CounterTableTests: XCTestCase {
    private func snapshot() -> StatsSnapshot {
        var traffic = TrafficStats()
        for counter in TrafficCounter.all { traffic.counts[counter] = UInt64(1_000 + counter.index) }
        let backend = BackendStats(name: "a", address: "127.0.0.1:8001", status: .up, adminState: .ready, weight: 1,
                                   check: nil, traffic: traffic)
        let service = ServiceStats(name: "web", listen: "127.0.0.1:80", frontend: traffic, backends: [backend],
                                   totals: traffic, status: "UP", allDownEvents: 0)
        let process = ProcessView(version: "test", pid: 1, uptimeSeconds: 1, workers: 1, openConnections: 0,
                                  tableRevision: 1, adminEnabled: false)
        return StatsSnapshot(process: process, discovery: nil, registrar: nil, services: [service])
    }

    func testTheTableIsInIndexOrderWithDistinctNames() {
        XCTAssertEqual(TrafficCounter.all.map(\.index), Array(0..<TrafficCounter.all.count))
        XCTAssertEqual(Set(TrafficCounter.all.map(\.name)).count, TrafficCounter.all.count)
        XCTAssertEqual(Set(TrafficCounter.all.compactMap(\.metric)).count, TrafficCounter.all.compactMap(\.metric).count)
        for counter in TrafficCounter.all where counter.csvColumn != nil {
            XCTAssertTrue(CSVRenderer.columns.contains(counter.csvColumn!), "\(counter): not an HAProxy column")
        }
    }

    /// The names dashboards, scripts and exporters read keep their meaning: each counter that
    /// existed before the table keeps its JSON key, CSV column, metric and page column, and the
    /// page's header is byte for byte the one written by hand before (a new row with a page column
    /// changes that header on purpose; a new row without one needs nothing here).
    func testPublishedNamesStay() {
        let published: [(name: String, csv: String?, metric: String, html: String?)] = [
            ("totalSessions", "stot", "sessions_total", "Sessions/Total"),
            ("bytesIn", "bin", "bytes_in_total", "Bytes/In"), ("bytesOut", "bout", "bytes_out_total", "Bytes/Out"),
            ("connectErrors", "econ", "connect_errors_total", "Errors/Conn"),
            ("retries", "wretr", "retries_total", "Errors/Retr"), ("redispatches", "wredis", "redispatches_total", "Errors/Redis"),
            ("failedSessions", nil, "failed_sessions_total", "Errors/Failed"), ("timeouts", nil, "timeouts_total", nil),
        ]
        for expected in published {
            guard let counter = TrafficCounter.all.first(where: { $0.name == expected.name }) else {
                XCTFail("\(expected.name) left the table")
                continue
            }
            XCTAssertEqual(counter.csvColumn, expected.csv, "\(counter)")
            XCTAssertEqual(counter.metric, expected.metric, "\(counter)")
            XCTAssertEqual(counter.html.map { "\($0.group)/\($0.title)" }, expected.html, "\(counter)")
        }
        let page = HTMLRenderer.render(snapshot(), refresh: nil)
        XCTAssertTrue(page.contains("""
            <table class="svc">
            <tr><th class="group"></th><th class="group" colspan="5">Server</th><th class="group" colspan="6">Sessions</th>\
            <th class="group" colspan="2">Bytes</th><th class="group" colspan="4">Errors</th></tr>
            <tr><th>Name</th><th>Status</th><th>Last check</th><th>Check time</th><th>Last change</th><th>Weight</th>\
            <th>Cur</th><th>Max</th><th>Total</th><th>Rate</th><th>Rate max</th><th>Last</th>\
            <th>In</th><th>Out</th><th>Conn</th><th>Retr</th><th>Redis</th><th>Failed</th></tr>

            """), "the page's header, as before the table")
    }

    func testEveryCounterIsInTheJSONUnderItsName() throws {
        let data = try JSONEncoder().encode(snapshot())
        let text = String(decoding: data, as: UTF8.self)
        for counter in TrafficCounter.all {
            XCTAssertTrue(text.contains("\"\(counter.name)\":\(1_000 + counter.index)"), "\(counter) missing from the JSON")
        }
        let decoded = try JSONDecoder().decode(StatsSnapshot.self, from: data)
        XCTAssertEqual(decoded, snapshot(), "the JSON reads back")
    }

    func testEveryExportedCounterIsAMetricFamily() {
        let text = MetricsRenderer.render(snapshot())
        for counter in TrafficCounter.all {
            guard let metric = counter.metric else { continue }
            for prefix in ["berth_frontend", "berth_backend"] {
                XCTAssertTrue(text.contains("# TYPE \(prefix)_\(metric) counter\n"), "\(prefix)_\(metric)")
                XCTAssertTrue(text.contains("\(prefix)_\(metric){"), "\(prefix)_\(metric) has no sample")
            }
            XCTAssertTrue(text.contains(" \(1_000 + counter.index)\n"), "\(counter)'s value")
        }
    }

    func testEveryCSVCounterFillsItsColumn() {
        let lines = CSVRenderer.render(snapshot()).split(separator: "\n")
        let header = lines[0].dropFirst(2).split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let rows = lines.dropFirst().map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
        XCTAssertEqual(rows.map { $0[1] }, ["FRONTEND", "a", "BACKEND"])
        for counter in TrafficCounter.all {
            guard let column = counter.csvColumn, let index = header.firstIndex(of: column) else { continue }
            XCTAssertEqual(rows[1][index], String(1_000 + counter.index), "server row, \(column)")
            XCTAssertEqual(rows[2][index], String(1_000 + counter.index), "BACKEND row, \(column)")
            XCTAssertEqual(rows[0][index], counter.csvOnFrontend ? String(1_000 + counter.index) : "", "FRONTEND row, \(column)")
        }
    }

    func testEveryPageCounterIsAColumnWithItsValue() {
        let html = HTMLRenderer.render(snapshot(), refresh: nil)
        for counter in TrafficCounter.all {
            guard let column = counter.html else { continue }
            XCTAssertTrue(html.contains("<th>\(column.title)</th>"), "\(counter)'s column")
            XCTAssertTrue(html.contains("<td>\(HTMLRenderer.grouped(UInt64(1_000 + counter.index)))</td>"), "\(counter)'s value")
        }
    }
}
