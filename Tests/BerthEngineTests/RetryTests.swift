import BerthEngine
import BerthSystem
import BerthTestSupport
import BerthWhoami
import Foundation
import XCTest

/// `--retry-on`: which backend failures move a session to the next backend, and that a client
/// leaving is never one of them.
final class RetryTests: DataPlaneTestCase {
    /// A backend that accepts, reads what it is sent and never answers (a host whose process
    /// hangs, or docker-proxy in front of a container that is gone); it closes when Berth does.
    private func silentBackend() throws -> TestBackend {
        let backend = try TestBackend { fd in
            var buffer = [UInt8](repeating: 0, count: 4096)
            while recv(fd, &buffer, buffer.count, 0) > 0 {}
            close(fd)
        }
        addTeardownBlock { backend.stop() }
        return backend
    }

    private func settings(emptyResponse: Bool = false, responseTimeout: Bool, serverTimeout: Int64 = 60_000) -> FrontendSettings {
        var settings = FrontendSettings(retries: 3, connectTimeout: 1_000, serverTimeout: serverTimeout)
        settings.retryOnEmptyResponse = emptyResponse
        settings.retryOnResponseTimeout = responseTimeout
        settings.firstByteTimeout = 300
        return settings
    }

    func testASilentBackendIsLeftForTheNextAfterTheFirstByteTimeout() throws {
        let silent = try silentBackend()
        let good = try whoami("good")
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort,
                      backends: [Backend(silent.address), Backend(good.address)],
                      settings: settings(emptyResponse: true, responseTimeout: true))],
            configure: { $0.workers = 1 })
        var slow = 0
        for _ in 0..<6 {
            let started = Date()
            XCTAssertEqual(try TestSocket.httpGet(listening["web"]!), "I'm good\n")
            // The loop clock counts whole milliseconds: a 300 ms timer may fire after 299.x.
            if Date().timeIntervalSince(started) >= 0.25 { slow += 1 }
        }
        let stats = engine.statistics().frontends["web"]!
        let silentStats = stats.backends[silent.address.description]!
        // Every other request drew the silent backend first: moved on after 300 ms, replayed.
        XCTAssertEqual(silentStats.redispatches, 3)
        XCTAssertEqual(silentStats.timeouts, 3)
        XCTAssertEqual(stats.traffic.redispatches, 3)
        XCTAssertEqual(stats.traffic.failedSessions, 0)
        XCTAssertEqual(slow, 3, "only the requests that met the silent backend waited for the timeout")
        XCTAssertTrue(eventually { silent.acceptedCount == 3 })
    }

    func testWithoutResponseTimeoutASilentBackendIsClosedAtTheServerTimeoutAndCounted() throws {
        let silent = try silentBackend()
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort, backends: [Backend(silent.address)],
                      settings: settings(emptyResponse: true, responseTimeout: false, serverTimeout: 500))],
            configure: { $0.workers = 1 })
        let started = Date()
        XCTAssertThrowsError(try TestSocket.httpGet(listening["web"]!), "no answer: the connection is closed empty")
        let waited = Date().timeIntervalSince(started)
        XCTAssertGreaterThanOrEqual(waited, 0.45)
        XCTAssertLessThan(waited, 3)
        let stats = engine.statistics().frontends["web"]!
        XCTAssertEqual(stats.backends[silent.address.description]!.timeouts, 1)
        XCTAssertEqual(stats.traffic.timeouts, 1)
        XCTAssertEqual(stats.traffic.redispatches, 0)
    }

    /// Health probes of an upstream balancer connect and close without a byte: the backend's
    /// close answers the client's FIN and is no failure, so there is exactly one backend
    /// connection per client and no redispatch.
    func testAClientThatLeavesWithoutAByteIsNeverRetried() throws {
        let servers = try ["a", "b"].map { try whoami($0) }
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort, backends: servers.map { Backend($0.address) },
                      settings: settings(emptyResponse: true, responseTimeout: true))],
            configure: { $0.workers = 1 })
        for index in 0..<20 {
            let fd = try TestSocket.connect(listening["web"]!)
            if index % 2 == 0 {
                // Half-closes, then waits for the backend's close to come through.
                shutdown(fd, CInt(SHUT_WR))
                var byte: UInt8 = 0
                XCTAssertEqual(recv(fd, &byte, 1, 0), 0, "the backend's close reaches the client")
            } else {
                usleep(20_000)  // connected to a backend by now
            }
            close(fd)
        }
        XCTAssertTrue(eventually { engine.openConnections == 0 })
        let stats = engine.statistics().frontends["web"]!
        XCTAssertEqual(stats.traffic.redispatches, 0)
        XCTAssertEqual(stats.traffic.totalSessions, 20)
        XCTAssertEqual(stats.backends.values.map(\.totalSessions).reduce(0, +), 20, "one backend connection per client")
        XCTAssertEqual(stats.backends.values.map(\.retries).reduce(0, +), 0)
    }

    /// The first-byte timer starts with the client's first byte: an idle client is not waiting
    /// for an answer, so its silent backend is not given up.
    func testAnIdleClientIsNotMovedByTheFirstByteTimeout() throws {
        let silent = try silentBackend()
        let good = try whoami("good")
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort,
                      backends: [Backend(silent.address), Backend(good.address)],
                      settings: settings(responseTimeout: true))],
            configure: { $0.workers = 1 })
        let fd = try TestSocket.connect(listening["web"]!)
        defer { close(fd) }
        usleep(900_000)  // three first-byte timeouts
        XCTAssertEqual(engine.statistics().frontends["web"]!.traffic.redispatches, 0)
        XCTAssertEqual(silent.acceptedCount, 1)
        // Its first byte starts the timer: then it is moved, and answered by the good one.
        try TestSocket.sendAll(fd, Array("GET / HTTP/1.0\r\n\r\n".utf8))
        let answer = String(decoding: try TestSocket.receiveAll(fd), as: UTF8.self)
        XCTAssertTrue(answer.hasSuffix("I'm good\n"), answer)
        XCTAssertEqual(engine.statistics().frontends["web"]!.traffic.redispatches, 1)
    }

    /// A listener on `host` that drops SYNs (closed at teardown).
    private func synDroppingListener(host: String) throws -> SocketAddress {
        let listener = try SynDroppingListener(host: host)
        addTeardownBlock { listener.close() }
        return listener.address
    }

    /// After a connect timed out (the host says nothing: maybe dead as a whole), the retry goes
    /// to a backend on another host, not to the next port of the same silent host.
    func testARetryAfterAConnectTimeoutAvoidsTheSilentHost() throws {
        let first = try synDroppingListener(host: "127.0.0.2")
        let second = try synDroppingListener(host: "127.0.0.2")
        let good = try whoami("good")
        let (engine, listening) = try startEngine(
            [Frontend(name: "web", listen: loopbackAnyPort,
                      backends: [Backend(first), Backend(second), Backend(good.address)],
                      settings: FrontendSettings(retries: 3, connectTimeout: 300))],
            configure: { $0.workers = 1 })
        let started = Date()
        XCTAssertEqual(try TestSocket.httpGet(listening["web"]!), "I'm good\n")
        let waited = Date().timeIntervalSince(started)
        let stats = engine.statistics().frontends["web"]!
        XCTAssertEqual(stats.backends[first.description]?.connectErrors, 1)
        XCTAssertEqual(stats.backends[second.description]?.connectErrors ?? 0, 0, "retried on the same silent host")
        XCTAssertLessThan(waited, 0.55, "one connect timeout, not two")
    }
}
