import BerthEngine
import BerthHealth
import BerthSystem
import Foundation
import XCTest

/// Operator weights and slow start in the router: what it publishes to a real engine.
final class WeightRoutingTests: XCTestCase {
    private func address(_ port: Int) -> SocketAddress { try! SocketAddress(parsing: "127.0.0.1:\(port)") }

    private func makeRouter() throws -> HealthRouter {
        var configuration = EngineConfiguration()
        configuration.workers = 1
        return try HealthRouter.make(configuration: configuration, policy: HealthPolicy())
    }

    private func table(_ ports: [Int], slowStart: Int64) -> RoutingTable {
        var settings = FrontendSettings()
        settings.slowStart = slowStart
        return RoutingTable(frontends: [Frontend(name: "web", listen: address(0), backends: ports.map { Backend(address($0)) },
                                                 settings: settings)])
    }

    private func key(_ port: Int) -> BackendKey { BackendKey(frontend: "web", backend: address(port).description) }

    func testWarmupIsLinearFromAThousandthToAll() {
        XCTAssertEqual(SlowStart.warmup(elapsed: 0, over: 10_000), 1)
        XCTAssertEqual(SlowStart.warmup(elapsed: 2_500, over: 10_000), 250)
        XCTAssertEqual(SlowStart.warmup(elapsed: 9_999, over: 10_000), 999)
        XCTAssertEqual(SlowStart.warmup(elapsed: 10_000, over: 10_000), Backend.fullWarmup)
        XCTAssertEqual(SlowStart.warmup(elapsed: 5, over: 0), Backend.fullWarmup)
        XCTAssertEqual(SlowStart.step(10_000), 1_000)
        XCTAssertEqual(SlowStart.step(300), 100)
    }

    func testABackendAddedLaterRampsUpAndTheFirstTableDoesNot() throws {
        let router = try makeRouter()
        defer { router.shutdown(drainTimeout: 0) }
        try router.apply(table([9001, 9002], slowStart: 1_000))
        XCTAssertEqual(router.weights()[key(9001)]?.warmup, Backend.fullWarmup, "the first table ramps nothing")
        try router.apply(table([9001, 9002, 9003], slowStart: 1_000))
        let first = router.weights()[key(9003)]?.warmup ?? -1
        XCTAssertLessThan(first, 200, "a new backend starts small")
        XCTAssertEqual(router.weights()[key(9001)]?.warmup, Backend.fullWarmup)
        var seen = [first]
        let settled = waitFor(timeout: 5) {
            let warmup = router.weights()[self.key(9003)]?.warmup ?? -1
            if warmup != seen.last { seen.append(warmup) }
            return warmup == Backend.fullWarmup
        }
        XCTAssertNotNil(settled, "the ramp never finished: \(seen)")
        XCTAssertEqual(seen, seen.sorted(), "\(seen)")
        XCTAssertGreaterThanOrEqual(seen.count, 4, "the ramp went in too few steps: \(seen)")
        // The engine got the ramped weights too.
        XCTAssertEqual(router.desiredTable().frontends[0].backends.count, 3)
    }

    func testAnOperatorWeightHoldsUntilResetOrRemoval() throws {
        let router = try makeRouter()
        defer { router.shutdown(drainTimeout: 0) }
        try router.apply(table([9001, 9002], slowStart: 0))
        try router.setWeight(5, for: key(9001))
        XCTAssertEqual(router.weights()[key(9001)], WeightInForce(weight: 5, warmup: Backend.fullWarmup, overridden: true))
        XCTAssertEqual(router.weights()[key(9002)]?.overridden, false)
        // A new table (the registry's) keeps the override while the backend is in it.
        try router.apply(table([9001, 9002], slowStart: 0))
        XCTAssertEqual(router.weights()[key(9001)]?.weight, 5)
        try router.setWeight(nil, for: key(9001))
        XCTAssertEqual(router.weights()[key(9001)]?.weight, 1)
        try router.setWeight(0, for: key(9002))
        try router.apply(table([9001], slowStart: 0))
        try router.apply(table([9001, 9002], slowStart: 0))
        XCTAssertEqual(router.weights()[key(9002)]?.weight, 1, "an override outlived its backend's removal")
        XCTAssertThrowsError(try router.setWeight(257, for: key(9001))) { XCTAssertEqual($0 as? AdminError, .badWeight(257)) }
        XCTAssertThrowsError(try router.setWeight(-1, for: key(9001)))
        XCTAssertThrowsError(try router.setWeight(2, for: key(9999))) {
            XCTAssertEqual($0 as? AdminError, .unknownBackend(self.key(9999)))
        }
    }

    func testABackendBackFromMaintenanceRamps() throws {
        let router = try makeRouter()
        defer { router.shutdown(drainTimeout: 0) }
        try router.apply(table([9001, 9002], slowStart: 2_000))
        try router.setAdminState(.maint, for: key(9002))
        try router.setAdminState(.ready, for: key(9002))
        XCTAssertLessThan(router.weights()[key(9002)]?.warmup ?? Backend.fullWarmup, 200)
        // An operator weight ramps the same way (the warmup scales whatever weight is in force).
        try router.setWeight(8, for: key(9002))
        XCTAssertEqual(router.weights()[key(9002)]?.weight, 8)
        XCTAssertLessThan(router.weights()[key(9002)]?.warmup ?? Backend.fullWarmup, 500)
    }
}
