import BerthEngine
import BerthSystem
import BerthWhoami
import Foundation
import XCTest

/// Round-robin and retries through a real engine on 127.0.0.1.
class DataPlaneTestCase: XCTestCase {
    private var descriptorsBefore = 0
    /// Engines and servers of the running test, stopped and released in `tearDown`.
    var engines: [Engine] = []
    var servers: [WhoamiServer] = []

    /// One full cycle (engine, backend, a request, shutdown) before any test measures fds, so
    /// that descriptors a library opens once per process are not counted as a test's leak.
    nonisolated(unsafe) private static var warmedUp = false

    override func setUp() {
        super.setUp()
        if !Self.warmedUp {
            Self.warmedUp = true
            if let server = try? WhoamiServer(listen: loopbackAnyPort, identity: "warm-up"),
               let engine = try? Engine(configuration: { var c = EngineConfiguration(); c.workers = 1; return c }()) {
                if let address = try? engine.apply(RoutingTable(frontends: [
                    Frontend(name: "warm-up", listen: loopbackAnyPort, backends: [Backend(server.address)]),
                ])).listening["warm-up"] {
                    _ = try? TestSocket.httpGet(address)
                }
                engine.shutdown(drainTimeout: 0)
                server.stop()
            }
        }
        descriptorsBefore = openDescriptorCount()
    }

    /// Stops what the test started, then checks that no fd is left open.
    override func tearDown() {
        for engine in engines { engine.shutdown(drainTimeout: 0) }
        for server in servers { server.stop() }
        engines = []
        servers = []
        let settled = eventually(timeout: 5) { openDescriptorCount() <= descriptorsBefore }
        XCTAssertTrue(settled, "fd leak: \(descriptorsBefore) open before, \(openDescriptorCount()) after: \(openDescriptorTargets())")
        super.tearDown()
    }

    /// Starts an engine serving `frontends`; returns it and where each frontend listens.
    func startEngine(
        _ frontends: [Frontend], configure: (inout EngineConfiguration) -> Void = { _ in }
    ) throws -> (Engine, [String: SocketAddress]) {
        var configuration = EngineConfiguration()
        configuration.workers = 2
        configure(&configuration)
        let engine = try Engine(configuration: configuration)
        engines.append(engine)
        let result = try engine.apply(RoutingTable(revision: 1, frontends: frontends))
        XCTAssertEqual(result.failures.count, 0, "\(result.failures)")
        return (engine, result.listening)
    }

    /// A backend that sends its one-byte tag and closes.
    func taggedBackend(_ tag: UInt8) throws -> TestBackend {
        let backend = try TestBackend { fd in
            _ = try? TestSocket.sendAll(fd, [tag])
            close(fd)
        }
        addTeardownBlock { backend.stop() }
        return backend
    }

    func whoami(_ identity: String) throws -> WhoamiServer {
        let server = try WhoamiServer(listen: loopbackAnyPort, identity: identity)
        servers.append(server)
        return server
    }
}

final class BalancingTests: DataPlaneTestCase {
    func testThirtyConnectionsLandTenTenTenInRotationOrder() throws {
        let servers = try ["a", "b", "c"].map { try whoami($0) }
        let (_, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort, backends: servers.map { Backend($0.address) })],
            configure: { $0.workers = availableCPUCount() })
        let frontend = listening["web"]!
        var answers: [String] = []
        for _ in 0..<30 { answers.append(try TestSocket.httpGet(frontend)) }
        let counts = Dictionary(grouping: answers, by: { $0 }).mapValues(\.count)
        XCTAssertEqual(counts, ["I'm a\n": 10, "I'm b\n": 10, "I'm c\n": 10])
        XCTAssertEqual(Set(answers[0..<3]).count, 3)
        for index in 3..<30 { XCTAssertEqual(answers[index], answers[index % 3], "rotation broken at \(index)") }
    }

    func testADeadBackendCostsNoClientAFailure() throws {
        let servers = try ["a", "b"].map { try whoami($0) }
        let dead = try TestSocket.unusedAddress()
        let backends = [Backend(servers[0].address), Backend(dead), Backend(servers[1].address)]
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort, backends: backends)])
        var failures = 0
        var answers: [String: Int] = [:]
        for _ in 0..<300 {
            do {
                answers[try TestSocket.httpGet(listening["web"]!), default: 0] += 1
            } catch {
                failures += 1
            }
        }
        XCTAssertEqual(failures, 0)
        XCTAssertEqual(answers.values.reduce(0, +), 300)
        // The dead backend's turns went to the next backend in order (b after it, wrapping to a).
        XCTAssertEqual(answers["I'm a\n"], 100)
        XCTAssertEqual(answers["I'm b\n"], 200)
        let stats = engine.statistics().frontends["web"]!
        XCTAssertEqual(stats.backends[dead.description]?.connectErrors, 100)
        XCTAssertEqual(stats.backends[dead.description]?.retries, 100)
        print("300 connections, 1 of 3 backends dead: 0 failures, \(stats.backends[dead.description]!.connectErrors) connects retried")
    }

    func testAllBackendsDownClosesTheClientPromptly() throws {
        let dead = try (0..<3).map { _ in Backend(try TestSocket.unusedAddress()) }
        let (engine, listening) = try startEngine([Frontend(name: "web", listen: loopbackAnyPort, backends: dead)])
        var slowest = 0.0
        for _ in 0..<20 {
            let fd = try TestSocket.connect(listening["web"]!)
            defer { close(fd) }
            let start = Date()
            let received = try TestSocket.receiveAll(fd)
            slowest = max(slowest, Date().timeIntervalSince(start))
            XCTAssertEqual(received.count, 0)
        }
        print("all backends down: client closed after at most \(Int(slowest * 1000)) ms")
        XCTAssertLessThan(slowest, 0.5)
        XCTAssertEqual(engine.statistics().frontends["web"]?.traffic.failedSessions, 20)
    }

    func testNoBackendsClosesTheClientAtOnce() throws {
        let (engine, listening) = try startEngine([Frontend(name: "empty", listen: loopbackAnyPort, backends: [])])
        let fd = try TestSocket.connect(listening["empty"]!)
        defer { close(fd) }
        XCTAssertEqual(try TestSocket.receiveAll(fd).count, 0)
        XCTAssertEqual(engine.statistics().frontends["empty"]?.traffic.failedSessions, 1)
    }
}
