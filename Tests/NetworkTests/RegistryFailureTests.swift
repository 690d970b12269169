// Failure matrix, rows 6 and 7: the client's berth loses etcd (a partition of 30 s; etcd's host
// dead for 8 s, longer than the registrars' lease TTL) while the registry changes. The last known table must keep serving with no
// failed request, and once etcd is reachable again the change must reach the routing within 1 s.
//
// When etcd's host dies (its link down, as against a partition, which drops IP packets only), the
// client's ARP entry for it fails too. A connect made just before the link came back leaves the
// entry resolving, and Linux asks again only after the neighbour's retransmission time (1 s by
// default): the network's own delay, which no client can shorten. That case's bound adds it.
//
// The change is made with etcdctl on the etcd host (its loopback, reachable while the host is
// cut off): b3's key, written at set-up without a lease, is deleted and b4's is put. Both run a
// whoami on host b that b's registrar does not manage, so no resync undoes the change.
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class RegistryFailureTests: MatrixTestCase {
    /// How soon after etcd is back the change must be routed.
    static let changeWithin = 1.0

    /// The client host's ARP retransmission time, seconds (`retrans_time_ms` of its interface).
    static func neighbourRetransmission(_ scene: Scene) -> Double {
        let text = try? scene.bed.withNetwork(of: "client") {
            try String(contentsOfFile: "/proc/sys/net/ipv4/neigh/\(NetworkTestBed.hostInterface)/retrans_time_ms", encoding: .utf8)
        }
        return (text.flatMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 1_000) / 1_000
    }

    /// 6. The client host partitioned from etcd for 30 s.
    func testClientCutOffFromEtcd() throws {
        let scene = try makeScene(Scene.Options(spares: true))
        try scene.putInstance("b3")
        try scene.startDiscover(ready: ["a1", "a2", "b1", "b2", "b3"])
        try outage(scene, seconds: 30, cut: { try scene.bed.partition("client", from: "etcd") },
                   restore: { try scene.bed.heal("client", from: "etcd") })
    }

    /// 7. etcd's host dead (link down) for 8 s, then back. Longer than the registrars' TTL: their
    /// leases expire meanwhile, and they must register again once etcd is back.
    func testEtcdHostDiesAndComesBack() throws {
        let scene = try makeScene(Scene.Options(spares: true))
        try scene.putInstance("b3")
        try scene.startDiscover(ready: ["a1", "a2", "b1", "b2", "b3"])
        let registered = ["a1", "a2", "b1", "b2"].map { scene.backends[$0]! }
        let fewestDuring = try outage(scene, seconds: 8, cut: { try scene.bed.setLink("etcd", up: false) },
                                      restore: { try scene.bed.setLink("etcd", up: true) }, watching: registered,
                                      within: Self.changeWithin + Self.neighbourRetransmission(scene))
        // The registrars' leases expired while etcd was cut off; etcd delivers those expiries the
        // moment it is back, before the registrars have put their keys again under new leases.
        // Those deletions are held (DiscoverySettings.outageHold) until the keys come back, so
        // the registrars' backends never leave the routing.
        var last = "", fewest = fewestDuring
        let back = waitUntil(timeout: 10, interval: 0.02) {
            guard let stats = try? scene.stats() else { return false }
            last = stats.summary(names: scene.names)
            let routed = registered.filter { stats.backend($0)?.status == "UP" }.count
            fewest = min(fewest, routed)
            return routed == registered.count && Set((try? scene.etcd.keys(prefix: Scene.prefix)) ?? []).isSuperset(of: registered.map { Scene.prefix + $0 })
        }
        print("etcd host back: the registrars' keys and backends back after \(back.map(milliseconds) ?? "more than 10 s") more "
              + "(as few as \(fewest) of \(registered.count) routed meanwhile): \(last)")
        XCTAssertNotNil(back, "the registrars' keys were not put again within 10 s of the change: \(last)")
        XCTAssertEqual(fewest, registered.count, "lease expiries took the registrars' backends out of the routing before they re-registered")
    }

    /// Runs the load; `cut` for `seconds`, changing the registry 2 s in; checks that the routing
    /// stayed as it was and no request failed; `restore`; measures until the change is routed
    /// (within `within` seconds).
    /// Returns the fewest of `watching` (addresses) routed UP at once while the change was awaited.
    @discardableResult
    private func outage(_ scene: Scene, seconds: Double, cut: () throws -> Void, restore: () throws -> Void,
                        watching: [String] = [], within: Double = changeWithin) throws -> Int {
        let b3 = scene.backends["b3"]!, b4 = scene.backends["b4"]!
        let load = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        defer { load.stop() }
        usleep(1_000_000)
        let cutAt = monotonicSeconds()
        try cut()
        usleep(2_000_000)
        try scene.deleteInstance("b3")
        try scene.putInstance("b4")
        let keys = try scene.etcd.keys(prefix: Scene.prefix)
        XCTAssertTrue(keys.contains(Scene.prefix + b4) && !keys.contains(Scene.prefix + b3), "etcd did not take the change: \(keys)")

        // While cut off: the last table serves (b3 in, b4 not yet); note when berth saw the loss.
        var leaked: [String] = [], disconnectedAfter: Double?
        while monotonicSeconds() < cutAt + seconds {
            if let stats = try? scene.stats() {
                if stats.backend(b4) != nil || stats.backend(b3) == nil { leaked.append(stats.summary(names: scene.names)) }
                if stats.connected == false && disconnectedAfter == nil { disconnectedAfter = monotonicSeconds() - cutAt }
            }
            usleep(250_000)
        }
        XCTAssertEqual(leaked, [], "the routing changed while etcd was unreachable: the cut did not cut")
        print("etcd unreachable for \(Int(seconds)) s: berth reported the watch down \(disconnectedAfter.map(milliseconds) ?? "never") after the cut")
        let during = load.samples.filter { $0.start >= cutAt }
        print("during the cut: \(LoadSummary(during))")

        let restoredAt = monotonicSeconds()
        try restore()
        var last = ""
        var fewest = Int.max, fewestWatched = watching.count
        let routed = waitUntil(timeout: 30, interval: 0.02) {
            guard let stats = try? scene.stats() else { return false }
            last = stats.summary(names: scene.names)
            fewest = min(fewest, stats.backends.filter { $0.status == "UP" }.count)
            fewestWatched = min(fewestWatched, watching.filter { stats.backend($0)?.status == "UP" }.count)
            return stats.backend(b4) != nil && stats.backend(b3) == nil
        }
        let routedAt = monotonicSeconds()
        let took = routed.map(milliseconds) ?? "more than 30 s"
        print("etcd reachable again: the change was routed after \(took) (as few as \(fewest) backends UP meanwhile): \(last)")
        XCTAssertNotNil(routed, "the change made while etcd was unreachable never reached the routing: \(last)")
        if let routed { XCTAssertLessThanOrEqual(routed, within, "the change reached the routing \(routed) s after etcd was back") }
        let answered = waitUntil(timeout: 3, interval: 0.05) { load.samples.contains { $0.start >= restoredAt && $0.answer == "b4" } }
        XCTAssertNotNil(answered, "b4 took no request within 3 s of being routed")
        usleep(500_000)

        let all = load.stop()
        let after = all.filter { $0.start >= routedAt }
        print("whole run: \(LoadSummary(all)); after the change: \(LoadSummary(after))")
        XCTAssertGreaterThan(during.count, 100)
        XCTAssertEqual(all.filter(\.failed).map { $0.failure ?? "?" }, [], "requests failed")
        XCTAssertGreaterThan(after.count, 10, "too few requests after the change to tell")
        XCTAssertEqual(after.compactMap(\.answer).filter { $0 == "b3" }, [], "b3 still took requests after its deletion was routed")
        return fewestWatched
    }
}
