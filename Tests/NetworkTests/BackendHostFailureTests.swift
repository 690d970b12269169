// Failure matrix, rows 1 and 2: backend host a cut off from the client (partition: its keys stay
// in etcd), and host a dead (link down: its keys expire). Either way the client's berth must
// mark a's backends DOWN within fall × inter + timeout, serve every request from b meanwhile with
// no failure and no slow answer, and bring a back when it returns.
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class BackendHostFailureTests: MatrixTestCase {
    /// fall (2) × inter (0.5 s) + check timeout (0.3 s), plus 3 s for jitter and scheduling.
    static let downWithin = 2 * 0.5 + 0.3 + 3
    /// rise (2) × inter (0.5 s), plus 3 s.
    static let upWithin = 2 * 0.5 + 3
    /// How long the matrix watches the routing after a's backends went down.
    static let hold = 3.0

    /// 1. Host a partitioned from the client (iptables DROP both ways: SYNs unanswered, no RST).
    func testPartitionedBackendHost() throws {
        let scene = try makeScene()
        try scene.startDiscover()
        let outcome = try failAndRepair(scene, fault: { try scene.bed.partition("a", from: "client") },
                                        repair: { try scene.bed.heal("a", from: "client") })
        // An unanswered SYN is a check timeout, not a pass and not a refusal.
        XCTAssertEqual(outcome.downRows.count, 2)
        for row in outcome.downRows {
            XCTAssertEqual(row.checkCode, "L4TOUT", "check of \(scene.names[row.address] ?? row.address) behind a partition: \(row.checkDetail ?? "-")")
        }
        let up = try XCTUnwrap(outcome.upSeconds, "a's backends did not come back up after heal")
        XCTAssertLessThanOrEqual(up, Self.upWithin, "a's backends came back \(up) s after heal")
    }

    /// 2. Host a's link down (the host is gone): as 1, and a's keys leave etcd within one TTL.
    func testDeadBackendHost() throws {
        let scene = try makeScene()
        try scene.startDiscover()
        let aAddress = scene.bed.host("a").address
        var expiry: Double?
        let outcome = try failAndRepair(scene, fault: { try scene.bed.setLink("a", up: false) }, whileDown: { cut in
            // The lease (TTL 3 s, kept alive every second) expires on etcd's side.
            _ = waitUntil(timeout: Scene.ttl + 5, interval: 0.1) {
                guard let keys = try? scene.etcd.keys(prefix: Scene.prefix) else { return false }
                if keys.contains(where: { $0.contains(aAddress) }) { return false }
                expiry = monotonicSeconds() - cut
                return true
            }
        }, repair: { try scene.bed.setLink("a", up: true) })
        let expired = try XCTUnwrap(expiry, "a's keys were still in etcd \(Scene.ttl + 5) s after its link went down")
        print("dead host: a's keys left etcd \(milliseconds(expired)) after its link went down (TTL \(Int(Scene.ttl)) s)")
        XCTAssertLessThanOrEqual(expired, Scene.ttl + 1.5, "a's keys outlived the TTL")
        // Back: a's registrar must register again (its lease is gone), then discovery routes.
        let up = try XCTUnwrap(outcome.upSeconds, "a's backends did not come back after its link came up")
        XCTAssertLessThanOrEqual(up, Scene.ttl + Self.upWithin, "a's backends routed again \(up) s after link up")
    }

    struct Outcome {
        /// a's rows when they were first all seen down.
        var downRows: [StatsView.Backend]
        /// Seconds from the repair until a's backends were UP in the stats again.
        var upSeconds: Double?
    }

    /// Runs the load, applies `fault` to host a, asserts a's backends leave the routing in
    /// time and that the load sees no failure and no slow answer from then on; `whileDown` runs
    /// then. Applies `repair` and measures until a's backends are UP and answer again.
    private func failAndRepair(_ scene: Scene, fault: () throws -> Void, whileDown: (Double) throws -> Void = { _ in },
                               repair: () throws -> Void) throws -> Outcome {
        let aAddresses = ["a1", "a2"].map { scene.backends[$0]! }
        let load = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        defer { load.stop() }
        usleep(1_000_000)
        let cut = monotonicSeconds()
        try fault()

        // Down: every a row DOWN (or gone, once its key expired).
        var last = ""
        var downRows: [StatsView.Backend] = []
        let down = waitUntil(timeout: Self.downWithin + 5, interval: 0.05) {
            guard let stats = try? scene.stats() else { return false }
            last = stats.summary(names: scene.names)
            let rows = aAddresses.compactMap(stats.backend)
            guard rows.allSatisfy({ $0.status == "DOWN" }) else { return false }
            downRows = rows
            return true
        }
        let downAt = monotonicSeconds()
        let downSeconds = try XCTUnwrap(down, "a's backends still routed \(Self.downWithin + 5) s after the fault: \(last)")
        print("a's backends down \(milliseconds(downSeconds)) after the fault: \(last)")
        XCTAssertLessThanOrEqual(downSeconds, Self.downWithin, "a's backends were marked down \(downSeconds) s after the fault")

        // They stay down (a check that passes against a dead host would flap them back up).
        var flapped: [String] = []
        try whileDown(cut)
        let holdEnd = monotonicSeconds() + Self.hold
        while monotonicSeconds() < holdEnd {
            if let stats = try? scene.stats() {
                let routed = aAddresses.compactMap(stats.backend).filter { $0.status != "DOWN" }
                if !routed.isEmpty { flapped.append(stats.summary(names: scene.names)) }
            }
            usleep(100_000)
        }
        XCTAssertEqual(flapped, [], "a's backends came back up while a was unreachable")
        let duringFault = load.samples.filter { $0.start >= cut && $0.start < downAt }
        let afterDown = load.samples.filter { $0.start >= downAt }
        print("fault → down: \(LoadSummary(duringFault))")
        print("down: \(LoadSummary(afterDown))")
        XCTAssertGreaterThan(afterDown.count, 20, "too few requests after a went down to tell")
        XCTAssertEqual(afterDown.filter(\.failed).map { $0.failure ?? "?" }, [], "requests failed after a's backends were down")
        XCTAssertLessThan(afterDown.map(\.seconds).max() ?? 0, 1.0, "a request took a second or more after a's backends were down")
        XCTAssertEqual(afterDown.compactMap(\.answer).filter { $0.hasPrefix("a") }, [], "a answered while cut off?")

        // Repair: UP again, then answering.
        let repaired = monotonicSeconds()
        try repair()
        let up = waitUntil(timeout: Self.upWithin + Scene.ttl + 5, interval: 0.05) {
            guard let stats = try? scene.stats() else { return false }
            last = stats.summary(names: scene.names)
            return aAddresses.allSatisfy { stats.backend($0)?.status == "UP" }
        }
        print("a's backends up \(up.map(milliseconds) ?? "never") after the repair: \(last)")
        if up != nil {
            let upAt = monotonicSeconds()
            let answered = waitUntil(timeout: 3, interval: 0.05) {
                Set(load.samples.filter { $0.start >= upAt }.compactMap(\.answer)).isSuperset(of: ["a1", "a2"])
            }
            XCTAssertNotNil(answered, "a1 and a2 were UP but took no request within 3 s")
        }
        let all = load.stop()
        print("whole run: \(LoadSummary(all)); after repair: \(LoadSummary(all.filter { $0.start >= repaired }))")
        return Outcome(downRows: downRows, upSeconds: up)
    }
}
