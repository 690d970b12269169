import BerthSystem
import BerthTestSupport
import Foundation
import Synchronization
import XCTest
@testable import BerthEngine
@testable import BerthHealth

/// The router publishing a desired table by its changes (what discovery sends) must give the
/// engine what the whole table gives it, with operator overrides and slow start in play.
final class TableChangesRouterTests: XCTestCase {
    func testADesiredTableAppliedByItsChangesPublishesWhatTheWholeTableDoes() throws {
        try compare(checks: nil)
    }

    /// With active checks: the checker is told the difference, and must end up checking the
    /// same backends as when told every backend (the published tables then depend on when each
    /// checker's probes ran, so only what is checked is compared).
    func testWithChecksTheCheckerChecksWhatTheWholeTableAsksFor() throws {
        var checks = CheckSettings()
        checks.interval = 60_000
        try compare(checks: checks)
    }

    private func compare(checks: CheckSettings?) throws {
        var (random, seed) = SplitMix64.replayable()
        var configuration = EngineConfiguration()
        configuration.workers = 1
        let byChanges = try HealthRouter.make(configuration: configuration, policy: HealthPolicy(checks: checks))
        let whole = try HealthRouter.make(configuration: configuration, policy: HealthPolicy(checks: checks))
        defer {
            byChanges.shutdown(drainTimeout: 0)
            whole.shutdown(drainTimeout: 0)
        }
        let names = (0..<10).map { String(format: "svc%02d", $0) }
        let any = try SocketAddress(parsing: "127.0.0.1:0")

        func makeFrontend(_ name: String) throws -> Frontend {
            let count = Int.random(in: 1...4, using: &random)
            var frontend = Frontend(name: name, listen: any, backends: try (0..<count).map { index in
                Backend(name: "i\(index)", address: try SocketAddress(host: "127.0.0.1", port: UInt16(30_000 + index)),
                        enabled: Int.random(in: 0..<6, using: &random) > 0, weight: Int.random(in: 1...3, using: &random))
            })
            if Int.random(in: 0..<4, using: &random) == 0 { frontend.settings.slowStart = 10_000 }
            return frontend
        }

        var current: [String: Frontend] = [:]
        var last: RoutingTable?
        for step in 1...150 {
            for _ in 0..<Int.random(in: 0...3, using: &random) {
                let name = names.randomElement(using: &random)!
                if Int.random(in: 0..<3, using: &random) == 0 { current[name] = nil } else { current[name] = try makeFrontend(name) }
            }
            let frontends = current.values.sorted { $0.name < $1.name }
            let table = RoutingTable(
                revision: UInt64(step), frontends: frontends, serial: RoutingTable.makeSerial(),
                changes: last.map { FrontendChanges(base: $0.serial, names: RoutingTable.changedNames(from: $0.frontends, to: frontends)) })
            var plain = table
            plain.changes = nil
            try byChanges.apply(table)
            try whole.apply(plain)
            last = table
            // Operator overrides on the table just applied, the same on both routers.
            if step % 7 == 0, let frontend = current.values.randomElement(using: &random), let backend = frontend.backends.randomElement(using: &random) {
                let key = BackendKey(frontend: frontend.name, backend: backend.name)
                let admin = AdminState.allCases.randomElement(using: &random)!
                let weight: Int? = Bool.random(using: &random) ? Int.random(in: 0...5, using: &random) : nil
                for router in [byChanges, whole] {
                    try router.setAdminState(admin, for: key)
                    try router.setWeight(weight, for: key)
                }
            }
            if checks != nil {
                XCTAssertEqual(Set(byChanges.health().keys), Set(whole.health().keys), "step \(step) (seed \(seed))")
                continue
            }
            let served = [byChanges, whole].map { router in router.engine.control.withLock { $0.published!.table.frontends } }
            XCTAssertEqual(served[0].map(\.name), served[1].map(\.name), "step \(step) (seed \(seed))")
            // Slow start ramps from when each router saw the backend: warmups may differ by the
            // milliseconds between the two applies. Everything else must be equal.
            let levelled = served.map { frontends in
                frontends.map { frontend in
                    var copy = frontend
                    for index in copy.backends.indices where copy.backends[index].warmup < Backend.fullWarmup { copy.backends[index].warmup = 1 }
                    return copy
                }
            }
            XCTAssertEqual(levelled[0], levelled[1], "step \(step) (seed \(seed))")
            XCTAssertEqual(byChanges.adminStates(), whole.adminStates(), "step \(step) (seed \(seed))")
            XCTAssertEqual(byChanges.weights().mapValues(\.weight), whole.weights().mapValues(\.weight), "step \(step) (seed \(seed))")
        }
        XCTAssertGreaterThan(byChanges.engine.control.withLock { $0.appliedByChanges }, 75,
                             "the tables were not applied by their changes: the test proves nothing")
        if checks != nil {
            // The checkers' own threads: every backend of the last table is checked (its first
            // check comes within 100 ms), and none that left it.
            let expected = Set(whole.health().keys)
            XCTAssertFalse(expected.isEmpty)
            let checked = waitUntil(timeout: 10, interval: 0.05) {
                byChanges.health().filter { $0.value.checksDone > 0 }.count == expected.count
            }
            XCTAssertNotNil(checked, "not every backend was checked: \(byChanges.health().filter { $0.value.checksDone == 0 }.keys)")
            XCTAssertEqual(Set(byChanges.health().keys), expected)
        }
    }
}
