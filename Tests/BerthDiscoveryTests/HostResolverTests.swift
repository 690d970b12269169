import BerthEngine
import BerthSystem
@testable import BerthDiscovery
import Synchronization
import XCTest

/// The resolver's thread, cache, refresh and change callbacks.
final class HostResolverTests: XCTestCase {
    func testSystemLookupOfLocalhostAndAnInvalidName() {
        switch HostResolver.systemLookup("localhost") {
        case .success(let address):
            XCTAssertTrue(["127.0.0.1", "::1"].contains(address.host), address.description)
        case .failure(let failure):
            XCTFail("localhost: \(failure.reason)")
        }
        guard case .failure(let failure) = HostResolver.systemLookup("nonexistent.invalid") else {
            return XCTFail("nonexistent.invalid resolved")
        }
        XCTAssertFalse(failure.reason.isEmpty)
    }

    func testResolvesOffTheCallerAndReportsResults() throws {
        let resolver = HostResolver()
        defer { resolver.stop() }
        let settled = expectation(description: "both names settled")
        settled.expectedFulfillmentCount = 2
        let seen = Mutex<[String: HostResolution]>([:])
        resolver.onChange { name, resolution in
            seen.withLock { $0[name] = resolution }
            settled.fulfill()
        }
        XCTAssertEqual(resolver.lookup("localhost"), .pending)
        resolver.track(["localhost", "nonexistent.invalid"])
        wait(for: [settled], timeout: 20)
        guard case .resolved(let address) = resolver.lookup("localhost") else { return XCTFail("\(resolver.lookup("localhost"))") }
        XCTAssertTrue(["127.0.0.1", "::1"].contains(address.host))
        guard case .failed = resolver.lookup("nonexistent.invalid") else { return XCTFail("should fail") }
        XCTAssertEqual(seen.withLock { Set($0.keys) }, ["localhost", "nonexistent.invalid"])
    }

    func testRefreshReportsChangesOnlyAndForgetsUntrackedNames() {
        let answer = Mutex("10.0.0.1")
        let lookups = Mutex(0)
        let resolver = HostResolver(refreshInterval: 20, retryInterval: 20) { name in
            lookups.withLock { $0 += 1 }
            return .success(try! SocketAddress(host: answer.withLock { $0 }, port: 0))
        }
        defer { resolver.stop() }
        let changes = Mutex<[HostResolution]>([])
        let first = expectation(description: "first answer")
        let second = expectation(description: "changed answer")
        resolver.onChange { _, resolution in
            let count = changes.withLock { $0.append(resolution); return $0.count }
            if count == 1 { first.fulfill() }
            if count == 2 { second.fulfill() }
        }
        resolver.track(["db.internal"])
        wait(for: [first], timeout: 5)
        // Refreshes with the same answer are not changes.
        let before = lookups.withLock { $0 }
        let deadline = MonotonicClock.milliseconds() + 5_000
        while lookups.withLock({ $0 }) < before + 3 && MonotonicClock.milliseconds() < deadline { usleep(5_000) }
        XCTAssertGreaterThanOrEqual(lookups.withLock { $0 }, before + 3, "refreshed every 20 ms")
        XCTAssertEqual(changes.withLock { $0.count }, 1)
        answer.withLock { $0 = "10.0.0.2" }
        wait(for: [second], timeout: 5)
        XCTAssertEqual(changes.withLock { $0 }, [.resolved(try! SocketAddress(host: "10.0.0.1", port: 0)),
                                                 .resolved(try! SocketAddress(host: "10.0.0.2", port: 0))])
        resolver.track([])
        XCTAssertEqual(resolver.lookup("db.internal"), .pending, "forgotten, asked again")
    }

    /// A transient DNS failure keeps the last good address; a new answer replaces it.
    func testAFailedLookupKeepsTheLastGoodAddress() {
        let answer = Mutex<String?>("10.0.0.1")
        let resolver = HostResolver(refreshInterval: 20, retryInterval: 20) { _ in
            guard let text = answer.withLock({ $0 }) else { return .failure(.init(reason: "Temporary failure in name resolution")) }
            return .success(try! SocketAddress(host: text, port: 0))
        }
        defer { resolver.stop() }
        let changes = Mutex<[HostResolution]>([])
        resolver.onChange { _, resolution in changes.withLock { $0.append(resolution) } }
        resolver.track(["db.internal"])
        let first = try! SocketAddress(host: "10.0.0.1", port: 0)
        XCTAssertTrue(waitUntil { resolver.lookup("db.internal") == .resolved(first) })
        answer.withLock { $0 = nil }
        XCTAssertTrue(waitUntil { resolver.heldFailureCount >= 3 }, "failures retried every 20 ms")
        XCTAssertEqual(resolver.lookup("db.internal"), .resolved(first), "still the last good address")
        answer.withLock { $0 = "10.0.0.2" }
        let second = try! SocketAddress(host: "10.0.0.2", port: 0)
        XCTAssertTrue(waitUntil { resolver.lookup("db.internal") == .resolved(second) })
        XCTAssertEqual(changes.withLock { $0 }, [.resolved(first), .resolved(second)], "the failures were no change")
        // A name that never resolved does fail.
        answer.withLock { $0 = nil }
        resolver.track(["db.internal", "new.internal"])
        XCTAssertTrue(waitUntil { if case .failed = resolver.lookup("new.internal") { return true }; return false })
    }

    private func waitUntil(_ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.milliseconds() + 5_000
        while !condition() {
            if MonotonicClock.milliseconds() > deadline { return false }
            usleep(5_000)
        }
        return true
    }

    func testCatalogUsesResolvedNames() {
        var catalog = Catalog(options: Catalog.Options(defaultListen: 80))
        catalog.reset(entries: [("/backends/s/a", Array("db.internal:5432".utf8))], revision: 1)
        let resolver = HostResolver { _ in .success(try! SocketAddress(host: "10.9.8.7", port: 0)) }
        defer { resolver.stop() }
        let resolved = expectation(description: "resolved")
        resolver.onChange { _, _ in resolved.fulfill() }
        resolver.track(catalog.hostNames)
        wait(for: [resolved], timeout: 5)
        let build = catalog.routingTable(bind: try! SocketAddress(host: "0.0.0.0", port: 0), now: 0, resolve: resolver.lookup)
        XCTAssertEqual(build.table.frontends.first?.backends.map(\.address), [try! SocketAddress(parsing: "10.9.8.7:5432")])
    }
}
