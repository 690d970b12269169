import BerthEngine
import BerthSystem
import BerthTestSupport
import Foundation
@testable import BerthDiscovery
import XCTest

/// The catalog's build from the changed services alone must be the build of every service.
final class CatalogChangesTests: XCTestCase {
    func testABuildFromTheChangedServicesEqualsTheWholeBuild() throws {
        var (random, seed) = SplitMix64.replayable()
        let bind = try SocketAddress(host: "10.1.2.3", port: 0)
        for linger in [Int64(0), 2_000] {
            var byChanges = Catalog(options: Catalog.Options(linger: linger))
            var whole = byChanges
            var now: Int64 = 1_000
            let resolve: (String) -> HostResolution = { _ in .resolved(try! SocketAddress(host: "10.9.9.9", port: 0)) }
            for step in 1...600 {
                let revision = Int64(step)
                let service = "s\(Int.random(in: 0..<12, using: &random))"
                let instance = "i\(Int.random(in: 0..<4, using: &random))"
                var event: Catalog.Event
                switch Int.random(in: 0..<200, using: &random) {
                case 0..<70:
                    event = .delete(key: "/backends/\(service)/\(instance)", revision: revision)
                case 70:
                    // Now and then an instance named by host, or a port another service uses.
                    event = .put(key: "/backends/\(service)/\(instance)", value: Array(#"{"host":"db.example","port":5432,"listen":7000}"#.utf8), revision: revision)
                case 71:
                    event = .put(key: "/backends/\(service)/\(instance)", value: Array(#"{"host":"10.0.0.1","port":80,"listen":7001}"#.utf8), revision: revision)
                case 72..<82:
                    let number = Int(service.dropFirst())!
                    let config = [#"{"retries":2}"#, #"{"check":{"kind":"tcp"}}"#, #"{"linger":"0s"}"#, #"{"listen":\#(7_100 + number)}"#, #"{"#].randomElement(using: &random)!
                    event = .put(key: "/backends/_config/\(service)", value: Array(config.utf8), revision: revision)
                case 82..<85:
                    event = .delete(key: "/backends/_config/\(service)", revision: revision)
                case 85..<92:
                    event = .put(key: "/backends/\(service)/\(instance)", value: Array(#"{"host":"10.0.0.2","port":81}"#.utf8), revision: revision)
                default:
                    let port = 20 + Int.random(in: 0..<3, using: &random)
                    let number = Int(service.dropFirst())!
                    event = .put(key: "/backends/\(service)/\(instance)",
                                 value: Array(#"{"host":"10.0.0.\#(port)","port":\#(port),"listen":\#(8_000 + number),"weight":\#(Int.random(in: 1...3, using: &random))}"#.utf8),
                                 revision: revision)
                }
                byChanges.apply([event])
                whole.apply([event])
                now += Int64.random(in: 0...700, using: &random)
                // Not every change is built: some tables cover several.
                guard Int.random(in: 0..<3, using: &random) > 0 else { continue }
                whole.changedServices = nil
                let a = byChanges.routingTable(bind: bind, now: now, resolve: resolve)
                let b = whole.routingTable(bind: bind, now: now, resolve: resolve)
                let context = "step \(step), linger \(linger) (seed \(seed))"
                XCTAssertEqual(a.table, b.table, context)
                XCTAssertEqual(a.checks, b.checks, context)
                XCTAssertEqual(a.problems, b.problems, context)
                XCTAssertEqual(a.lingering, b.lingering, context)
                XCTAssertEqual(a.nextEvaluation, b.nextEvaluation, context)
                XCTAssertEqual(a.hostNames, b.hostNames, context)
                if let changes = a.table.changes, let last = lastTable[linger] {
                    XCTAssertEqual(changes.base, last.serial, context)
                    XCTAssertEqual(changes.names, RoutingTable.changedNames(from: last.frontends, to: a.table.frontends), context)
                }
                lastTable[linger] = a.table
            }
            print("linger \(linger): \(byChanges.routingMemory.builtByChanges) builds from the changes alone")
            XCTAssertGreaterThan(byChanges.routingMemory.builtByChanges, 10, "linger \(linger): no build from the changes alone: the test proves nothing")
        }
    }

    private var lastTable: [Int64: RoutingTable] = [:]
}
