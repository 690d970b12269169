import BerthEngine
import BerthSystem
import BerthHealth
import BerthTestSupport
import Foundation
import XCTest

/// Passive health (`--observe-errors`, HAProxy's `observe layer4`) against backends that fail
/// silently: a connect that times out, and a backend that accepts and never answers, count as
/// that backend's failures, as a refused connect does.
final class PassiveTests: XCTestCase {
    /// Active checks that cannot take anything down within the test (fall 10, every 60 s): only
    /// passive observation can.
    private func router(observeErrors: Int) throws -> HealthRouter {
        var configuration = EngineConfiguration()
        configuration.workers = 1
        configuration.observeErrors = observeErrors
        let checks = CheckSettings(kind: .tcp, interval: 60_000, timeout: 5_000, rise: 1, fall: 10)
        return try HealthRouter.make(configuration: configuration, policy: HealthPolicy(checks: checks))
    }

    func testConnectTimeoutsOfLiveTrafficEjectASilentBackend() throws {
        let dropping = try SynDroppingListener()
        defer { dropping.close() }
        let silent = dropping.address
        let good = try WhoamiServerHandle(identity: "good")
        defer { good.stop() }
        let router = try router(observeErrors: 1)
        defer { router.shutdown(drainTimeout: 0) }
        let frontend = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"),
                     backends: [Backend(silent), Backend(good.address)],
                     settings: FrontendSettings(retries: 3, connectTimeout: 200)),
        ])).listening["web"]!
        var slow = 0
        for _ in 0..<10 {
            let started = Date()
            XCTAssertEqual(try fetch(frontend), "I'm good\n")
            if Date().timeIntervalSince(started) >= 0.15 { slow += 1 }  // whole-ms loop clock: 199.x ms counts
        }
        let key = BackendKey(frontend: "web", backend: silent.description)
        XCTAssertEqual(router.health()[key]?.status, .down, "one connect timeout takes it down (observe-errors 1)")
        XCTAssertEqual(router.health()[key]?.ejections, 1)
        XCTAssertEqual(slow, 1, "only the first request waited for the connect timeout")
        XCTAssertEqual(router.engine.statistics().frontends["web"]?.backends[silent.description]?.connectErrors, 1)
    }

    /// Slow is not dead: a backend whose answers come after the first-byte timeout loses those
    /// requests to the next backend, but live traffic does not eject it (under load that would
    /// only move its load onto the others).
    func testFirstByteTimeoutsDoNotEjectASlowBackend() throws {
        let slow = try ScriptedServer { usleep(400_000); return .send(Array("HTTP/1.0 200 OK\r\n\r\nI'm slow\n".utf8), thenClose: true) }
        defer { slow.stop() }
        let good = try WhoamiServerHandle(identity: "good")
        defer { good.stop() }
        let router = try router(observeErrors: 1)
        defer { router.shutdown(drainTimeout: 0) }
        var settings = FrontendSettings(retries: 3, connectTimeout: 1_000)
        settings.retryOnResponseTimeout = true
        settings.firstByteTimeout = 200
        let frontend = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"),
                     backends: [Backend(slow.address), Backend(good.address)], settings: settings),
        ])).listening["web"]!
        for _ in 0..<6 { XCTAssertEqual(try fetch(frontend), "I'm good\n") }
        let key = BackendKey(frontend: "web", backend: slow.address.description)
        XCTAssertNotEqual(router.health()[key]?.status, .down)
        XCTAssertEqual(router.health()[key]?.ejections, 0)
        let stats = router.engine.statistics().frontends["web"]!
        XCTAssertEqual(stats.traffic.redispatches, 3)
        XCTAssertEqual(stats.backends[slow.address.description]?.timeouts, 3)
    }
}
