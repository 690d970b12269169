import BerthSystem
import BerthTestSupport
import Foundation
import Synchronization
import XCTest
@testable import BerthEngine

/// A table applied by its changes (`RoutingTable.changes`, what discovery sends) must leave the
/// engine and its workers exactly where the whole table leaves them.
final class TableChangesTests: DataPlaneTestCase {
    private func published(_ engine: Engine) -> (frontends: [Frontend], schedules: [[Int32]?], cursors: Set<String>, loads: [String: Set<String>]) {
        engine.control.withLock { state in
            let table = state.published!
            return (table.table.frontends, table.schedules, Set(table.cursors.keys), table.loads.mapValues { Set($0.keys) })
        }
    }

    func testATableAppliedByItsChangesEndsWhereTheWholeTableDoes() throws {
        var (random, seed) = SplitMix64.replayable()
        let backends = try (1...4).map { try taggedBackend(UInt8($0)) }
        var configuration = EngineConfiguration()
        configuration.workers = 2
        let byChanges = try Engine(configuration: configuration)
        let whole = try Engine(configuration: configuration)
        engines += [byChanges, whole]
        let fixedPorts = try (0..<2).map { _ in try SocketAddress(host: "127.0.0.1", port: UInt16(try freeLoopbackPort())) }
        let names = (0..<12).map { String(format: "f%02d", $0) }

        func makeFrontend(_ name: String) -> Frontend {
            var chosen = backends.indices.filter { _ in Bool.random(using: &random) }
            if chosen.isEmpty { chosen = [Int.random(in: 0..<4, using: &random)] }
            var frontend = Frontend(name: name, listen: loopbackAnyPort, backends: chosen.map { index in
                var backend = Backend(name: "b\(index + 1)", address: backends[index].address,
                                      enabled: Int.random(in: 0..<5, using: &random) > 0, weight: Int.random(in: 1...3, using: &random))
                if Int.random(in: 0..<8, using: &random) == 0 { backend.weight = 0 }
                return backend
            })
            frontend.settings.balance = BalanceMode.allCases.randomElement(using: &random)!
            return frontend
        }

        var current: [String: Frontend] = [:]
        var accepted: RoutingTable?
        var refusals = 0
        var everListened: [String: SocketAddress] = [:]
        for step in 1...200 {
            var next = current
            for _ in 0..<Int.random(in: 0...3, using: &random) {
                let name = names.randomElement(using: &random)!
                switch Int.random(in: 0..<10, using: &random) {
                case 0..<3: next[name] = nil
                case 3: next[name]?.listen = fixedPorts.randomElement(using: &random)!
                default: next[name] = makeFrontend(name)
                }
            }
            // Now and then a table to refuse: two frontends on one address, or a bad weight.
            if step % 17 == 0, next.count >= 2 {
                let pair = next.keys.sorted().prefix(2)
                for name in pair { next[name]!.listen = fixedPorts[0] }
            } else if step % 23 == 0, let name = next.keys.sorted().first {
                next[name]!.backends[0].weight = 999
            }
            let frontends = next.values.sorted { $0.name < $1.name }
            let table = RoutingTable(
                revision: UInt64(step), frontends: frontends, serial: RoutingTable.makeSerial(),
                changes: accepted.map { FrontendChanges(base: $0.serial, names: RoutingTable.changedNames(from: $0.frontends, to: frontends)) })
            let outcomes = [byChanges, whole].map { engine -> Engine.ApplyResult? in
                var plain = table
                if engine === whole { plain.changes = nil }
                return try? engine.apply(plain)
            }
            XCTAssertEqual(outcomes[0] == nil, outcomes[1] == nil, "step \(step) (seed \(seed)): one engine refused the table, the other did not")
            guard let result = outcomes[0], let wholeResult = outcomes[1] else {
                refusals += 1
                continue
            }
            XCTAssertEqual(result.failures.keys.sorted(), wholeResult.failures.keys.sorted(), "step \(step) (seed \(seed))")
            XCTAssertEqual(Set(result.listening.keys), Set(wholeResult.listening.keys), "step \(step) (seed \(seed))")
            let (a, b) = (published(byChanges), published(whole))
            XCTAssertEqual(a.frontends, b.frontends, "step \(step) (seed \(seed))")
            XCTAssertEqual(a.schedules, b.schedules, "step \(step) (seed \(seed))")
            XCTAssertEqual(a.cursors, b.cursors, "step \(step) (seed \(seed))")
            XCTAssertEqual(a.loads, b.loads, "step \(step) (seed \(seed))")
            current = next
            accepted = table
            for (name, address) in result.listening { everListened[name] = address }
        }
        let fast = byChanges.control.withLock { $0.appliedByChanges }
        XCTAssertGreaterThan(fast, 100, "the tables were not applied by their changes: the test proves nothing")
        XCTAssertGreaterThan(refusals, 5)

        // The workers: every frontend of the last table answers from one of its candidates;
        // those that left it no longer listen.
        let listening = byChanges.listeningAddresses()
        usleep(100_000)
        // (Unless a listener of either engine took its port since: both bind port 0.)
        let taken = Set(listening.values).union(whole.listeningAddresses().values)
        for (name, address) in everListened where current[name] == nil && !taken.contains(address) {
            if let fd = try? TestSocket.connect(address) {
                close(fd)
                XCTFail("\(name) left the table but still listens on \(address) (seed \(seed))")
            }
        }
        for frontend in current.values.sorted(by: { $0.name < $1.name }) {
            let candidates = Set(frontend.backends.filter { $0.enabled && $0.weight > 0 }.map { UInt8($0.name.dropFirst())! })
            guard let address = listening[frontend.name] else { XCTFail("\(frontend.name) does not listen"); continue }
            for _ in 0..<4 {
                let fd = try TestSocket.connect(address)
                defer { close(fd) }
                let tag = try? TestSocket.receiveExactly(fd, 1)
                if candidates.isEmpty {
                    XCTAssertNil(tag, "\(frontend.name) has no candidate but answered")
                } else {
                    XCTAssertTrue(tag.map { candidates.contains($0[0]) } ?? false,
                                  "\(frontend.name) answered \(String(describing: tag)), not one of \(candidates.sorted()) (seed \(seed))")
                }
            }
        }
    }
}
