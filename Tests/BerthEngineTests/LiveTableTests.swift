import BerthEngine
import BerthSystem
import BerthTestSupport
import Foundation
import XCTest

/// Replacing backend sets and frontends while connections are open.
final class LiveTableTests: DataPlaneTestCase {
    /// A backend that first sends its one-byte tag, then echoes until EOF.
    private func echoBackend(tag: UInt8) throws -> TestBackend {
        let backend = try TestBackend { fd in
            defer { close(fd) }
            guard (try? TestSocket.sendAll(fd, [tag])) != nil else { return }
            var buffer = [UInt8](repeating: 0, count: 16384)
            while true {
                let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                guard count > 0, (try? TestSocket.sendAll(fd, Array(buffer[0..<count]))) != nil else { return }
            }
        }
        addTeardownBlock { backend.stop() }
        return backend
    }

    /// Connects and reads the tag of the backend it reached.
    private func open(_ address: SocketAddress) throws -> (fd: CInt, tag: UInt8) {
        let fd = try TestSocket.connect(address)
        return (fd, try TestSocket.receiveExactly(fd, 1)[0])
    }

    private func echo(_ fd: CInt, _ text: String) throws -> Bool {
        try TestSocket.sendAll(fd, Array(text.utf8))
        return try TestSocket.receiveExactly(fd, text.utf8.count) == Array(text.utf8)
    }

    func testReplacingTheBackendSetKeepsOpenConnectionsAndMovesNewOnes() throws {
        let old = try [echoBackend(tag: 1), echoBackend(tag: 2)]
        let new = try [echoBackend(tag: 3), echoBackend(tag: 4)]
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: old.map { Backend($0.address) })])
        let address = listening["svc"]!
        var open: [(fd: CInt, tag: UInt8)] = []
        for _ in 0..<50 { open.append(try self.open(address)) }
        defer { for connection in open { close(connection.fd) } }
        XCTAssertEqual(Set(open.map(\.tag)), [1, 2])
        for (index, connection) in open.enumerated() { XCTAssertTrue(try echo(connection.fd, "before \(index)")) }

        let result = try engine.apply(RoutingTable(revision: 2, frontends: [
            Frontend(name: "svc", listen: address, backends: new.map { Backend($0.address) }),
        ]))
        XCTAssertEqual(result.listening["svc"], address, "the listener must stay where it was")
        var fresh: [UInt8] = []
        for _ in 0..<20 {
            let connection = try self.open(address)
            fresh.append(connection.tag)
            close(connection.fd)
        }
        XCTAssertEqual(Set(fresh), [3, 4], "new connections must go to the new set only")
        XCTAssertEqual(fresh.filter { $0 == 3 }.count, 10)
        for (index, connection) in open.enumerated() {
            XCTAssertTrue(try echo(connection.fd, "after the swap \(index), a longer message"), "connection \(index)")
        }
        for connection in open { shutdown(connection.fd, CInt(SHUT_WR)) }
        for connection in open { XCTAssertEqual(try TestSocket.receiveAll(connection.fd).count, 0) }
        XCTAssertEqual(engine.statistics().revision, 2)
    }

    func testRemovedBackendConnectionsAreClosedAfterTheDrainTimeout() throws {
        let old = try echoBackend(tag: 1)
        let new = try echoBackend(tag: 2)
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: [Backend(old.address)])],
            configure: { $0.drainTimeout = 300 })
        let connection = try open(listening["svc"]!)
        defer { close(connection.fd) }
        _ = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "svc", listen: listening["svc"]!, backends: [Backend(new.address)]),
        ]))
        XCTAssertTrue(try echo(connection.fd, "still served while draining"))
        let start = Date()
        XCTAssertEqual(try TestSocket.receiveAll(connection.fd).count, 0)
        let waited = Date().timeIntervalSince(start)
        print("drained connection closed after \(Int(waited * 1000)) ms (drain timeout 300 ms)")
        XCTAssertLessThan(waited, 2)
    }

    /// An instance that moved (same name, another address: a container restarted on a new
    /// published port) is a removed backend: its open connections drain like any other's.
    func testABackendWhoseAddressChangesUnderTheSameNameIsDrained() throws {
        let old = try echoBackend(tag: 1)
        let new = try echoBackend(tag: 2)
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: [Backend(name: "c1", address: old.address)])],
            configure: { $0.drainTimeout = 300 })
        let connection = try open(listening["svc"]!)
        defer { close(connection.fd) }
        XCTAssertEqual(connection.tag, 1)
        _ = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "svc", listen: listening["svc"]!, backends: [Backend(name: "c1", address: new.address)]),
        ]))
        let moved = try open(listening["svc"]!)
        close(moved.fd)
        XCTAssertEqual(moved.tag, 2, "new connections go to the new address")
        XCTAssertTrue(try echo(connection.fd, "still served while draining"))
        let start = Date()
        XCTAssertEqual(try TestSocket.receiveAll(connection.fd).count, 0)
        let waited = Date().timeIntervalSince(start)
        XCTAssertLessThan(waited, 2, "the connection to the old address was never drained")
    }

    /// A backend removed while a session is still connecting to it keeps its counters until
    /// that session ends: the connect error it then meets is counted on it, not lost.
    func testCountersOfASessionStillConnectingOutliveItsBackendsRemoval() throws {
        let dropping = try SynDroppingListener()
        defer { dropping.close() }
        let silent = dropping.address
        let other = try echoBackend(tag: 2)
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: [Backend(silent)],
                      settings: FrontendSettings(retries: 0, connectTimeout: 400))],
            configure: { $0.workers = 1 })
        let client = try TestSocket.connect(listening["svc"]!)
        defer { close(client) }
        usleep(100_000)  // connecting to the silent backend
        _ = try engine.apply(RoutingTable(revision: 2, frontends: [
            Frontend(name: "svc", listen: listening["svc"]!, backends: [Backend(other.address)],
                     settings: FrontendSettings(retries: 0, connectTimeout: 400)),
        ]))
        XCTAssertEqual(try TestSocket.receiveAll(client).count, 0, "closed at its connect timeout")
        XCTAssertEqual(engine.statistics().frontends["svc"]?.backends[silent.description]?.connectErrors, 1)
    }

    /// A table that changes one frontend leaves the others as they were (their rotation goes
    /// on where it was), and still drops the counters of a backend removed earlier from one of
    /// those others once its last connection has closed.
    func testAChangeToOneFrontendLeavesTheOthersAndPrunesWhatLeftThem() throws {
        let a1 = try echoBackend(tag: 1), a2 = try echoBackend(tag: 2), b1 = try echoBackend(tag: 3)
        let (engine, listening) = try startEngine([
            Frontend(name: "a", listen: loopbackAnyPort, backends: [Backend(a1.address), Backend(a2.address)]),
            Frontend(name: "b", listen: loopbackAnyPort, backends: [Backend(b1.address)]),
        ], configure: { $0.workers = 1 })
        let a = listening["a"]!, b = listening["b"]!
        let held = try open(a)
        XCTAssertEqual(held.tag, 1)
        // a loses a1 while a connection to it is open: its counters stay while it drains.
        _ = try engine.apply(RoutingTable(revision: 2, frontends: [
            Frontend(name: "a", listen: a, backends: [Backend(a2.address)]),
            Frontend(name: "b", listen: b, backends: [Backend(b1.address)]),
        ]))
        XCTAssertTrue(try echo(held.fd, "draining"))
        XCTAssertNotNil(engine.statistics().frontends["a"]?.backends[a1.address.description])
        close(held.fd)
        XCTAssertNotNil(waitUntil(timeout: 5) { engine.openConnections == 0 }, "the drained connection never closed")
        // Only b changes: a is kept as it was, and a1's counters, no longer held, go.
        let b2 = try echoBackend(tag: 4)
        _ = try engine.apply(RoutingTable(revision: 3, frontends: [
            Frontend(name: "a", listen: a, backends: [Backend(a2.address)]),
            Frontend(name: "b", listen: b, backends: [Backend(b1.address), Backend(b2.address)]),
        ]))
        let tags = try (0..<4).map { _ in
            let connection = try open(b)
            close(connection.fd)
            return connection.tag
        }
        XCTAssertEqual(Set(tags), [3, 4], "b's new backend takes connections")
        let onA = try open(a)
        close(onA.fd)
        XCTAssertEqual(onA.tag, 2)
        XCTAssertTrue(eventually { engine.statistics().frontends["a"]?.backends[a1.address.description] == nil },
                      "the removed backend's counters were kept after its last connection closed")
        XCTAssertEqual(engine.statistics().frontends["a"]?.backends[a2.address.description]?.totalSessions, 1)
    }

    func testFrontendsAddedAndRemovedAtRuntime() throws {
        let first = try echoBackend(tag: 1)
        let second = try echoBackend(tag: 2)
        let (engine, listening) = try startEngine(
            [Frontend(name: "one", listen: loopbackAnyPort, backends: [Backend(first.address)])])
        let result = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "one", listen: listening["one"]!, backends: [Backend(first.address)]),
            Frontend(name: "two", listen: loopbackAnyPort, backends: [Backend(second.address)]),
        ]))
        let two = try XCTUnwrap(result.listening["two"])
        let onTwo = try open(two)
        XCTAssertEqual(onTwo.tag, 2)
        defer { close(onTwo.fd) }

        _ = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "one", listen: listening["one"]!, backends: [Backend(first.address)]),
        ]))
        // The removed frontend no longer accepts ...
        XCTAssertTrue(eventually { (try? TestSocket.connect(two, timeout: 1)).map { close($0); return false } ?? true },
                      "a removed frontend still accepts")
        // ... but its open connection runs on.
        XCTAssertTrue(try echo(onTwo.fd, "still here"))
        let onOne = try open(listening["one"]!)
        close(onOne.fd)
        XCTAssertEqual(onOne.tag, 1)
    }

    func testAListenerThatCannotBindIsReportedForThatFrontendAlone() throws {
        let backend = try echoBackend(tag: 1)
        var occupied = try Sockets.listen(on: loopbackAnyPort, reusePort: false)
        defer { occupied.close() }
        let taken = try Sockets.localAddress(occupied.raw)
        let engine = try Engine(configuration: { var c = EngineConfiguration(); c.workers = 2; return c }())
        engines.append(engine)
        let result = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "blocked", listen: taken, backends: [Backend(backend.address)]),
            Frontend(name: "fine", listen: loopbackAnyPort, backends: [Backend(backend.address)]),
        ]))
        XCTAssertEqual(result.failures["blocked"]?.errno, EADDRINUSE)
        XCTAssertNotNil(result.listening["fine"])
        let connection = try open(result.listening["fine"]!)
        close(connection.fd)
        XCTAssertEqual(connection.tag, 1)
    }

    func testADisabledBackendKeepsItsConnectionsWithNoDeadlineAndGetsNoNewOnes() throws {
        let first = try echoBackend(tag: 1)
        let second = try echoBackend(tag: 2)
        let backends = [Backend(first.address), Backend(second.address)]
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: backends)],
            configure: { $0.drainTimeout = 200 })
        let address = listening["svc"]!
        let onFirst = try open(address)
        defer { close(onFirst.fd) }
        XCTAssertEqual(onFirst.tag, 1)
        var disabled = backends
        disabled[0].enabled = false
        _ = try engine.apply(RoutingTable(frontends: [Frontend(name: "svc", listen: address, backends: disabled)]))
        for _ in 0..<6 {
            let connection = try open(address)
            close(connection.fd)
            XCTAssertEqual(connection.tag, 2, "a disabled backend must get no new connection")
        }
        // Past the drain timeout, the connection to the disabled backend still works.
        usleep(400_000)
        XCTAssertTrue(try echo(onFirst.fd, "still open"))
        _ = try engine.apply(RoutingTable(frontends: [Frontend(name: "svc", listen: address, backends: backends)]))
        let tags = try (0..<4).map { _ -> UInt8 in
            let connection = try open(address)
            close(connection.fd)
            return connection.tag
        }
        XCTAssertEqual(Set(tags), [1, 2], "enabled again, it is back in the rotation")
    }

    func testReapplyingTheBoundAddressKeepsTheListenerAndItsQueuedConnections() throws {
        let backend = try echoBackend(tag: 1)
        let (engine, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: [Backend(backend.address)])])
        let address = listening["svc"]!
        // Connections keep arriving while tables naming the bound address (not port 0) are
        // applied: none may be reset, as it would be if the listeners were rebound.
        final class Failures: @unchecked Sendable {
            let lock = NSLock()
            var count = 0
            var done = false
        }
        let failures = Failures()
        let client = Thread {
            for _ in 0..<400 {
                do {
                    let fd = try TestSocket.connect(address)
                    defer { close(fd) }
                    _ = try TestSocket.receiveExactly(fd, 1)
                } catch {
                    failures.lock.lock(); failures.count += 1; failures.lock.unlock()
                }
            }
            failures.lock.lock(); failures.done = true; failures.lock.unlock()
        }
        client.start()
        for revision in 2..<40 {
            let result = try engine.apply(RoutingTable(revision: UInt64(revision), frontends: [
                Frontend(name: "svc", listen: address, backends: [Backend(backend.address)]),
            ]))
            XCTAssertEqual(result.listening["svc"], address)
            usleep(5_000)
        }
        XCTAssertTrue(eventually(timeout: 30) { failures.lock.lock(); defer { failures.lock.unlock() }; return failures.done })
        XCTAssertEqual(failures.count, 0, "connections reset while the table was re-applied")
    }
}
