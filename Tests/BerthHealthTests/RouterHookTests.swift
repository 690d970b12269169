import BerthEngine
import BerthSystem
import BerthHealth
import Synchronization
import XCTest

/// `HealthRouter.onPublish` and `seed` (the state file's hooks), through a real router and engine.
final class RouterHookTests: XCTestCase {
    private func router(checks: CheckSettings?) throws -> HealthRouter {
        var configuration = EngineConfiguration()
        configuration.workers = 1
        return try HealthRouter.make(configuration: configuration, policy: HealthPolicy(checks: checks), alwaysCheck: true)
    }

    func testOnPublishSeesEveryAppliedTableWithHealthAndOverrides() throws {
        let backend = try WhoamiServerHandle(identity: "one")
        defer { backend.stop() }
        let router = try router(checks: CheckSettings(kind: .tcp, interval: 50, timeout: 500, rise: 1, fall: 1))
        defer { router.shutdown(drainTimeout: 0) }
        let seen = Mutex<[AppliedRouting]>([])
        router.onPublish { applied in seen.withLock { $0.append(applied) } }
        let table = RoutingTable(revision: 9, frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"), backends: [Backend(backend.address)]),
        ])
        try router.apply(table)
        let key = BackendKey(frontend: "web", backend: backend.address.description)
        XCTAssertEqual(seen.withLock { $0.first?.desired }, table)
        XCTAssertNotNil(waitFor(timeout: 5) { seen.withLock { $0.last?.health[key] } == .up }, "a health change is published")
        try router.setAdminState(.drain, for: key)
        XCTAssertEqual(seen.withLock { $0.last?.adminStates }, [key: .drain])
    }

    /// A seeded "down" backend takes no traffic until its checks pass; a seeded override holds.
    func testSeedGivesTheNextTableItsHealthAndOverrides() throws {
        let up = try WhoamiServerHandle(identity: "up"), down = try WhoamiServerHandle(identity: "down"),
            drained = try WhoamiServerHandle(identity: "drained")
        defer { up.stop(); down.stop(); drained.stop() }
        // Checks far apart and rise 3: the seeded states hold for minutes.
        let router = try router(checks: CheckSettings(kind: .tcp, interval: 60_000, timeout: 500, rise: 3, fall: 1))
        defer { router.shutdown(drainTimeout: 0) }
        let downKey = BackendKey(frontend: "web", backend: down.address.description)
        let drainedKey = BackendKey(frontend: "web", backend: drained.address.description)
        router.seed(health: [downKey: .down], adminStates: [drainedKey: .drain])
        let frontend = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"),
                     backends: [Backend(up.address), Backend(down.address), Backend(drained.address)]),
        ])).listening["web"]!
        XCTAssertEqual(router.adminStates(), [drainedKey: .drain])
        XCTAssertEqual(router.health()[downKey]?.status, .down)
        let answers = try (0..<6).map { _ in try fetch(frontend) }
        XCTAssertEqual(Set(answers), ["I'm up\n"])
        // The seed is used once: a backend added later starts as the policy says (up).
        let later = try WhoamiServerHandle(identity: "later")
        defer { later.stop() }
        try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: frontend, backends: [Backend(up.address), Backend(later.address)]),
        ]))
        XCTAssertNotEqual(router.health()[BackendKey(frontend: "web", backend: later.address.description)]?.status, .down)
    }
}
