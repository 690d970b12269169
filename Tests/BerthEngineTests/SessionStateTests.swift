@testable import BerthEngine
@testable import BerthSystem
import Glibc
import Synchronization
import XCTest

/// A session's state machine driven event by event (`SessionHarness`): the orderings real
/// sockets rarely produce on demand, each one deterministic.
final class SessionStateTests: XCTestCase {
    private func connectErrors(_ runtime: BackendRuntime?) -> UInt64 {
        runtime?.counters.connectErrors.load(ordering: .relaxed) ?? 0
    }

    /// The client's event redispatches the session (its backend reset before answering); the old
    /// backend's event, queued in the same epoll batch, must not reach the new connect, which
    /// has the old socket's fd number. Before the fix (no new generation on redispatch) it
    /// completed the connect at once: no connect timeout, no connect error, no passive report.
    func testAnEventOfTheOldBackendAfterARedispatchDoesNotCompleteTheNewConnect() throws {
        let harness = try SessionHarness(settings: FrontendSettings(retryOnEmptyResponse: true))
        harness.install([("a", SessionHarness.address(1)), ("b", SessionHarness.address(2))])
        let session = harness.accept()
        XCTAssertEqual(session.state, .connecting)
        let firstName = try XCTUnwrap(session.server?.backend.name)
        let oldFD = session.backend.raw
        let oldGeneration = session.generation
        harness.deliver(Epoll.writable, to: session, backend: true, generation: oldGeneration)
        XCTAssertEqual(session.state, .relaying)

        // The client's request arrives; writing it to the backend finds the backend gone.
        try XCTUnwrap(harness.sockets.peer(oldFD)).close()
        try XCTUnwrap(harness.sockets.peer(session.client.raw)).send(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        harness.deliver(Epoll.readable, to: session, backend: false, generation: oldGeneration)
        XCTAssertEqual(session.state, .connecting, "redispatched")
        let secondName = try XCTUnwrap(session.server?.backend.name)
        XCTAssertNotEqual(secondName, firstName)
        XCTAssertEqual(session.backend.raw, oldFD, "the new socket has the number the old one had")
        XCTAssertNotEqual(session.generation, oldGeneration)

        // The old socket's hang-up, queued before the redispatch in the same batch.
        harness.deliver(Epoll.readable | Epoll.error | Epoll.hangup, to: session, backend: true, generation: oldGeneration)
        XCTAssertEqual(session.state, .connecting, "a stale event of the old backend completed the new connect")
        XCTAssertFalse(harness.sockets.calls.contains("pendingError \(oldFD)"))

        // The new connect ends as a connect: at its timeout, counted on its backend.
        harness.advance(to: 1_000 + FrontendSettings().connectTimeout)
        XCTAssertEqual(connectErrors(harness.backendRuntime(secondName)), 1)
        XCTAssertEqual(session.silentHost, harness.backendRuntime(secondName)?.backend.address.withPort(0))
    }

    /// The current generation's events are still acted on after a redispatch.
    func testTheNewBackendsEventCompletesTheConnectAndReplaysTheRequest() throws {
        let harness = try SessionHarness(settings: FrontendSettings(retryOnEmptyResponse: true))
        harness.install([("a", SessionHarness.address(1)), ("b", SessionHarness.address(2))])
        let session = harness.accept()
        harness.deliver(Epoll.writable, to: session, backend: true, generation: session.generation)
        let request = Array("GET / HTTP/1.1\r\n\r\n".utf8)
        try XCTUnwrap(harness.sockets.peer(session.backend.raw)).close()
        try XCTUnwrap(harness.sockets.peer(session.client.raw)).send(request)
        harness.deliver(Epoll.readable, to: session, backend: false, generation: session.generation)
        XCTAssertEqual(session.state, .connecting)
        harness.deliver(Epoll.writable, to: session, backend: true, generation: session.generation)
        XCTAssertEqual(session.state, .relaying)
        XCTAssertEqual(harness.sockets.peer(session.backend.raw)?.received(), request, "the request replayed to the next backend")
    }

    /// A backend whose address changes under the same name: the old one is drained like any
    /// removed backend (its sessions get the drain deadline), new sessions go to the new address.
    /// Before the fix the old runtime was forgotten without `removed`, so its sessions never drained.
    func testABackendThatMovedUnderTheSameNameIsDrained() throws {
        let harness = try SessionHarness(settings: FrontendSettings())
        harness.install([("a", SessionHarness.address(1))])
        let session = harness.accept()
        harness.deliver(Epoll.writable, to: session, backend: true, generation: session.generation)
        XCTAssertEqual(session.state, .relaying)
        let old = try XCTUnwrap(session.server)
        XCTAssertEqual(session.drainDeadline, .max)

        harness.install([("a", SessionHarness.address(3))])
        XCTAssertTrue(old.removed)
        XCTAssertFalse(harness.backendRuntime("a") === old)
        let drainAt = 1_000 + harness.worker.configuration.drainTimeout
        XCTAssertEqual(session.drainDeadline, drainAt)

        let next = harness.accept()
        XCTAssertEqual(next.server?.backend.address, SessionHarness.address(3))
        harness.advance(to: drainAt)
        XCTAssertEqual(session.state, .free, "the moved backend's session was closed at the drain deadline")
        XCTAssertEqual(next.state, .connecting)
    }

    /// The same name at the same address keeps its runtime (and counters, open sessions).
    func testABackendKeptAtItsAddressKeepsItsRuntime() throws {
        let harness = try SessionHarness(settings: FrontendSettings())
        harness.install([("a", SessionHarness.address(1)), ("b", SessionHarness.address(2))])
        let kept = try XCTUnwrap(harness.backendRuntime("a"))
        harness.install([("a", SessionHarness.address(1))])
        XCTAssertTrue(harness.backendRuntime("a") === kept)
        XCTAssertFalse(kept.removed)
    }

    /// A listener that epoll refuses (ENOSPC from max_user_watches in production; here EPERM,
    /// a regular file) is counted as a loop error and accepting pauses and retries: the worker
    /// carries on. It was a fatalError.
    func testAListenerEpollRefusesIsCountedAndRetried() throws {
        let harness = try SessionHarness(settings: FrontendSettings())
        let path = "/tmp/berth-harness-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        unlink(path)
        harness.install([("a", SessionHarness.address(1))], listeners: [SessionHarness.frontend: fd])
        let registry = harness.worker.handle.registry
        XCTAssertEqual(registry.loopErrors.load(ordering: .relaxed), 1)
        XCTAssertTrue(harness.worker.acceptPaused)
        harness.advance(to: 1_000 + harness.worker.configuration.acceptRetryDelay)
        XCTAssertEqual(registry.loopErrors.load(ordering: .relaxed), 2, "registering was tried again after the retry delay")
        XCTAssertTrue(harness.worker.acceptPaused)
    }

    /// Two workers accept at the same moment under `--maxconn 1`: the second one's whole turn
    /// runs while the first is inside accept4. Counting after the accept (a load, then an add)
    /// let both in; counting before it lets exactly one in and pauses the other.
    func testTwoWorkersAcceptingAtOnceNeverPassMaxconn() throws {
        let shared = EngineShared()
        let first = try SessionHarness(settings: FrontendSettings(), shared: shared) { $0.maxConnections = 1 }
        let second = try SessionHarness(settings: FrontendSettings(), shared: shared) { $0.maxConnections = 1 }
        for harness in [first, second] {
            harness.install([("a", SessionHarness.address(1))])
            harness.sockets.pendingClients = 1
        }
        let secondFrontend = try XCTUnwrap(second.worker.frontends.first { $0.name == SessionHarness.frontend })
        let firstFrontend = try XCTUnwrap(first.worker.frontends.first { $0.name == SessionHarness.frontend })
        first.sockets.duringAccept = { second.worker.acceptConnections(secondFrontend, listener: secondFrontend.listener.raw) }
        first.worker.acceptConnections(firstFrontend, listener: firstFrontend.listener.raw)

        XCTAssertEqual(first.worker.activeSessions + second.worker.activeSessions, 1, "sessions open on both workers")
        XCTAssertEqual(shared.connections.load(ordering: .relaxed), 1)
        XCTAssertTrue(first.worker.acceptPaused || second.worker.acceptPaused, "the worker at the limit paused")
    }
}
