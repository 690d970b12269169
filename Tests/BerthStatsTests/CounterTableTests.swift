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
