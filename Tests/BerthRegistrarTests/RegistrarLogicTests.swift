// The registrar's lease and write logic against an in-memory store (a test double for these
// unit tests only; the acceptance tests run on a real etcd).
@testable import BerthRegistrar
import BerthTestSupport
import Synchronization
import XCTest

/// etcd's lease semantics in memory: keys attached to a lease vanish with it. `failing` makes
/// every call throw, like an unreachable etcd.
final class InMemoryStore: RegistrationStore {
    struct State {
        var nextLease: Int64 = 100
        var leases: Set<Int64> = []
        var keys: [String: (value: String, lease: Int64)] = [:]
        var failing = false
        var calls: [String] = []
    }

    struct Unreachable: Error {}

    let state = Mutex(State())

    var values: [String: String] { state.withLock { $0.keys.mapValues(\.value) } }
    var calls: [String] { state.withLock { $0.calls } }
    func setFailing(_ failing: Bool) { state.withLock { $0.failing = failing } }

    /// Drops a lease and its keys, as etcd does when a lease expires.
    func expire(_ lease: Int64) {
        state.withLock { state in
            state.leases.remove(lease)
            state.keys = state.keys.filter { $0.value.lease != lease }
        }
    }

    private func access<Result>(_ call: String, _ body: (inout State) throws -> Result) throws -> Result {
        try state.withLock { state in
            guard !state.failing else { throw Unreachable() }
            state.calls.append(call)
            return try body(&state)
        }
    }

    func grantLease(ttl: Int64) async throws -> Int64 {
        try access("grant") { state in
            state.nextLease += 1
            state.leases.insert(state.nextLease)
            return state.nextLease
        }
    }

    func keepAliveOnce(lease: Int64) async throws -> Int64 {
        try access("keepalive") { $0.leases.contains(lease) ? 15 : 0 }
    }

    func revokeLease(_ lease: Int64) async throws {
        try access("revoke") { state in
            state.leases.remove(lease)
            state.keys = state.keys.filter { $0.value.lease != lease }
        }
    }

    func put(key: String, value: String, lease: Int64) async throws {
        try access("put") { state in
            guard state.leases.contains(lease) else { throw Unreachable() }
            state.keys[key] = (value, lease)
        }
    }

    func delete(key: String) async throws {
        try access("delete") { state in state.keys[key] = nil }
    }

    func get(prefix: String) async throws -> [String: String] {
        try access("get") { state in state.keys.filter { $0.key.hasPrefix(prefix) }.mapValues(\.value) }
    }

    func get(keys: [String]) async throws -> [String: String] {
        let wanted = Set(keys)
        return try access("get") { state in state.keys.filter { wanted.contains($0.key) }.mapValues(\.value) }
    }
}

final class RegistrarLogicTests: XCTestCase {
    private func makeRegistrar(_ store: InMemoryStore, statics: [String], resync: Duration = .seconds(30)) throws -> Registrar {
        let registrations = try statics.map { try StaticService(parsing: $0).registration }
        let configuration = RegistrarConfiguration(ttlSeconds: 3, resyncInterval: resync, statics: registrations)
        return Registrar(configuration: configuration, store: store)
    }

    private func start(_ registrar: Registrar) -> Task<Void, Error> {
        Task { try await registrar.run() }
    }

    func testStaticServicesAreRegisteredUnderOneLeaseAndRevokedOnShutdown() async throws {
        let store = InMemoryStore()
        let registrar = try makeRegistrar(store, statics: ["whoami=127.0.0.5:8001@8000", "jwilder/whoami=127.0.0.6:8002"])
        let task = start(registrar)
        let took = await eventually(timeout: 2) { store.values.count == 2 }
        XCTAssertNotNil(took)
        XCTAssertEqual(store.values["/backends/whoami/127.0.0.5:8001"],
                       #"{"host":"127.0.0.5","port":8001,"listen":8000,"weight":1,"meta":{"static":"true"}}"#)
        XCTAssertNotNil(store.values["/backends/jwilder%2Fwhoami/127.0.0.6:8002"])
        XCTAssertEqual(store.state.withLock { Set($0.keys.values.map(\.lease)) }.count, 1)
        XCTAssertEqual(registrar.status.registered, 2)
        XCTAssertNotNil(registrar.status.leaseID)

        registrar.shutdown()
        try await task.value
        XCTAssertEqual(store.values, [:])
        XCTAssertEqual(store.calls.last, "revoke")
        XCTAssertNil(registrar.status.leaseID)
    }

    func testLostLeaseIsGrantedAgainAndEveryKeyPutBack() async throws {
        let store = InMemoryStore()
        let registrar = try makeRegistrar(store, statics: ["a=127.0.0.1:1", "b=127.0.0.1:2"])
        let task = start(registrar)
        await assertEventually(timeout: 2) { store.values.count == 2 }
        let first = try XCTUnwrap(registrar.status.leaseID)
        store.expire(first)
        XCTAssertEqual(store.values.count, 0)
        // Checked at least once a second.
        let took = await eventually(timeout: 2) { store.values.count == 2 }
        XCTAssertNotNil(took, "keys not back after the lease expired")
        XCTAssertNotEqual(registrar.status.leaseID, first)
        registrar.shutdown()
        try await task.value
    }

    func testUnreachableStoreIsRetriedUntilItAnswers() async throws {
        let store = InMemoryStore()
        store.setFailing(true)
        let registrar = try makeRegistrar(store, statics: ["a=127.0.0.1:1"])
        let task = start(registrar)
        try await Task.sleep(for: .milliseconds(1500))
        XCTAssertEqual(registrar.status.registered, 0)
        XCTAssertFalse(registrar.status.etcdReachable)
        store.setFailing(false)
        await assertEventually(timeout: 2) { store.values.count == 1 }
        XCTAssertTrue(registrar.status.etcdReachable)
        registrar.shutdown()
        try await task.value
    }

    func testResyncPutsBackAKeyDeletedBehindOurBack() async throws {
        let store = InMemoryStore()
        let registrar = try makeRegistrar(store, statics: ["a=127.0.0.1:1"], resync: .milliseconds(200))
        let task = start(registrar)
        await assertEventually(timeout: 2) { store.values.count == 1 }
        try await store.delete(key: "/backends/a/127.0.0.1:1")
        await assertEventually(timeout: 2, "the resync did not repair etcd") { store.values.count == 1 }
        registrar.shutdown()
        try await task.value
    }

    func testShutdownBeforeAnythingWasWrittenReturns() async throws {
        let store = InMemoryStore()
        store.setFailing(true)
        let registrar = try makeRegistrar(store, statics: ["a=127.0.0.1:1"])
        let task = start(registrar)
        registrar.shutdown()
        let finished = await eventually(timeout: 5) { registrar.status.leaseID == nil && store.values.isEmpty }
        XCTAssertNotNil(finished)
        try await task.value
        await XCTAssertThrowsErrorAsync { try await registrar.run() }
    }
}

func XCTAssertThrowsErrorAsync(_ body: () async throws -> Void, file: StaticString = #filePath, line: UInt = #line) async {
    do {
        try await body()
        XCTFail("no error thrown", file: file, line: line)
    } catch {}
}
