import BerthEngine
import BerthSystem
import BerthHealth
import Foundation
import XCTest

/// The all-down policy and the state of new backends, through a real router and engine.
final class PolicyRoutingTests: XCTestCase {
    /// A TLS check against a plain-HTTP whoami always fails: a backend that serves traffic but is
    /// "down" for its checks.
    private func router(allDown: AllDownPolicy, newBackendState: NewBackendState = .up,
                        kind: CheckKind = .tls(TLSCheck())) throws -> HealthRouter {
        var configuration = EngineConfiguration()
        configuration.workers = 1
        let checks = CheckSettings(kind: kind, interval: 50, timeout: 500, rise: 2, fall: 1)
        return try HealthRouter.make(configuration: configuration,
                                     policy: HealthPolicy(checks: checks, newBackendState: newBackendState, allDown: allDown))
    }

    /// A router over one frontend `web` whose only backend fails its checks, once it is down.
    private func routerWithItsOnlyBackendDown(allDown: AllDownPolicy, backend: WhoamiServerHandle) throws -> (HealthRouter, SocketAddress) {
        let router = try router(allDown: allDown)
        let frontend = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"), backends: [Backend(backend.address)]),
        ])).listening["web"]!
        let key = BackendKey(frontend: "web", backend: backend.address.description)
        XCTAssertNotNil(waitFor(timeout: 5) { router.health()[key]?.status == .down })
        return (router, frontend)
    }

    func testAllDownRejectClosesNewClientsAtOnceAndCountsThem() throws {
        let backend = try WhoamiServerHandle(identity: "failing-checks")
        defer { backend.stop() }
        let (router, frontend) = try routerWithItsOnlyBackendDown(allDown: .reject, backend: backend)
        defer { router.shutdown(drainTimeout: 0) }
        let start = Date()
        XCTAssertThrowsError(try fetch(frontend), "with every backend down the client must be closed")
        XCTAssertLessThan(Date().timeIntervalSince(start), 0.5)
        XCTAssertEqual(router.allDownEvents()["web"], 1)
        XCTAssertNotNil(waitFor(timeout: 2) { router.engine.statistics().frontends["web"]?.traffic.failedSessions == 1 })
    }

    func testAllDownTryAllRoutesAnywayAndCountsPanicSessions() throws {
        let backend = try WhoamiServerHandle(identity: "failing-checks")
        defer { backend.stop() }
        let (router, frontend) = try routerWithItsOnlyBackendDown(allDown: .tryAll, backend: backend)
        defer { router.shutdown(drainTimeout: 0) }
        usleep(100_000)  // the table with the panic flag reaches the worker
        XCTAssertEqual(try fetch(frontend), "I'm failing-checks\n")
        XCTAssertEqual(router.allDownEvents()["web"], 1)
        XCTAssertEqual(router.engine.statistics().frontends["web"]?.traffic.panicSessions, 1)
    }

    func testANewBackendStartingDownGetsTrafficOnlyAfterItsRiseChecks() throws {
        let old = try WhoamiServerHandle(identity: "old")
        let fresh = try WhoamiServerHandle(identity: "fresh")
        defer { old.stop(); fresh.stop() }
        let router = try router(allDown: .reject, newBackendState: .down, kind: .http(HTTPCheck()))
        defer { router.shutdown(drainTimeout: 0) }
        let listen = try SocketAddress(parsing: "127.0.0.1:0")
        let frontend = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: listen, backends: [Backend(old.address)]),
        ])).listening["web"]!
        XCTAssertNotNil(waitFor(timeout: 5) { (try? fetch(frontend)) == "I'm old\n" }, "the first backend comes up after its checks")
        try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: frontend, backends: [Backend(old.address), Backend(fresh.address)]),
        ]))
        let freshKey = BackendKey(frontend: "web", backend: fresh.address.description)
        // Until two checks passed (rise 2, every 50 ms) it gets nothing.
        var early: [String] = []
        while router.health()[freshKey]?.status != .up && early.count < 200 {
            do {
                early.append(try fetch(frontend))
            } catch {
                XCTFail("request \(early.count) failed: \(error); health \(router.health())")
                return
            }
        }
        XCTAssertFalse(early.contains("I'm fresh\n"), "a backend starting down took traffic before its checks")
        XCTAssertNotNil(waitFor(timeout: 5) { router.health()[freshKey]?.status == .up })
        usleep(50_000)
        let later = try (0..<4).map { _ in try fetch(frontend) }
        XCTAssertTrue(later.contains("I'm fresh\n"), "\(later)")
    }
}
