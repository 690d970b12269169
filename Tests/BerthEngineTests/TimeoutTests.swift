import BerthEngine
import BerthSystem
import BerthWhoami
import Foundation
import XCTest

final class TimeoutTests: DataPlaneTestCase {
    func testAnIdleClientIsClosedAfterTheClientTimeout() throws {
        let server = try whoami("idle")
        let settings = FrontendSettings(clientTimeout: 300, serverTimeout: 10_000)
        let (engine, listening) = try startEngine(
            [Frontend(name: "idle", listen: loopbackAnyPort, backends: [Backend(server.address)], settings: settings)])
        let fd = try TestSocket.connect(listening["idle"]!)
        defer { close(fd) }
        let start = Date()
        XCTAssertEqual(try TestSocket.receiveAll(fd).count, 0)
        let waited = Date().timeIntervalSince(start)
        print("idle client closed after \(Int(waited * 1000)) ms (client timeout 300 ms)")
        XCTAssertGreaterThan(waited, 0.25)
        XCTAssertLessThan(waited, 2)
        XCTAssertEqual(engine.statistics().frontends["idle"]?.traffic.timeouts, 1)
    }

    /// The backend side moves no byte (a backend that accepts and says nothing, a client that
    /// waits for it): the server timeout closes the connection, long before the client timeout.
    func testAnIdleBackendIsClosedAfterTheServerTimeout() throws {
        let silent = try TestBackend { fd in
            var buffer = [UInt8](repeating: 0, count: 4096)
            while recv(fd, &buffer, buffer.count, 0) > 0 {}
            close(fd)
        }
        addTeardownBlock { silent.stop() }
        let settings = FrontendSettings(clientTimeout: 10_000, serverTimeout: 300)
        let (engine, listening) = try startEngine(
            [Frontend(name: "silent", listen: loopbackAnyPort, backends: [Backend(silent.address)], settings: settings)])
        let fd = try TestSocket.connect(listening["silent"]!)
        defer { close(fd) }
        let start = Date()
        XCTAssertEqual(try TestSocket.receiveAll(fd).count, 0)
        let waited = Date().timeIntervalSince(start)
        print("idle backend side: closed after \(Int(waited * 1000)) ms (server timeout 300 ms, client timeout 10 s)")
        XCTAssertGreaterThan(waited, 0.25)
        XCTAssertLessThan(waited, 2)
        XCTAssertEqual(engine.statistics().frontends["silent"]?.traffic.timeouts, 1)
    }

    func testAnActiveConnectionOutlivesTheIdleTimeout() throws {
        let server = try whoami("busy")
        let settings = FrontendSettings(clientTimeout: 300, serverTimeout: 300)
        let (_, listening) = try startEngine(
            [Frontend(name: "busy", listen: loopbackAnyPort, backends: [Backend(server.address)], settings: settings)])
        let fd = try TestSocket.connect(listening["busy"]!)
        defer { close(fd) }
        // Ten requests 100 ms apart: one second in all, each gap under the timeout.
        for _ in 0..<10 {
            try TestSocket.sendAll(fd, Array("GET / HTTP/1.1\r\nHost: t\r\n\r\n".utf8))
            let response = String(decoding: try TestSocket.receiveExactly(fd, 88), as: UTF8.self)
            XCTAssertTrue(response.hasSuffix("I'm busy\n"), response)
            usleep(100_000)
        }
    }

    /// A loopback "blackhole": a listener with backlog 0 whose accept queue is full, so further
    /// SYNs are dropped and connects hang (no packet leaves 127.0.0.1).
    private func blackhole() throws -> (SocketAddress, [CInt]) {
        var listener = try Sockets.listen(on: loopbackAnyPort, reusePort: false, backlog: 0)
        let address = try Sockets.localAddress(listener.raw)
        var fillers: [CInt] = [listener.release()]
        for _ in 0..<4 {
            let fd = socket(AF_INET, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_NONBLOCK.rawValue), 0)
            address.description.withCString { _ in }
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = address.port.bigEndian
            sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
            _ = withUnsafePointer(to: &sin) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            fillers.append(fd)
        }
        usleep(100_000)
        return (address, fillers)
    }

    func testABlackholedBackendIsGivenUpAfterTheConnectTimeoutAndTheNextOneServes() throws {
        let server = try whoami("alive")
        let (hole, fds) = try blackhole()
        defer { for fd in fds { close(fd) } }
        // Sanity: the blackhole really does not complete a connect.
        XCTAssertThrowsError(try TestSocket.connect(hole, timeout: 0.3))
        let settings = FrontendSettings(retries: 3, connectTimeout: 300)
        let (engine, listening) = try startEngine(
            [Frontend(name: "bh", listen: loopbackAnyPort, backends: [Backend(hole), Backend(server.address)], settings: settings)],
            configure: { $0.workers = 1 })
        let start = Date()
        XCTAssertEqual(try TestSocket.httpGet(listening["bh"]!), "I'm alive\n")
        let waited = Date().timeIntervalSince(start)
        print("blackholed backend: answered by the next one after \(Int(waited * 1000)) ms (connect timeout 300 ms)")
        XCTAssertGreaterThan(waited, 0.25)
        XCTAssertLessThan(waited, 2)
        let stats = engine.statistics().frontends["bh"]!
        XCTAssertEqual(stats.backends[hole.description]?.connectErrors, 1)
        XCTAssertEqual(stats.backends[server.address.description]?.totalSessions, 1)
    }

    /// HAProxy's users read `timeout client 0` as "no timeout": it must not close every
    /// connection at once. A timeout too long to add to the clock saturates ("never") instead of
    /// wrapping into the past.
    func testZeroAndHugeIdleTimeoutsNeverCloseAConnection() throws {
        let server = try whoami("patient")
        for (client, backend) in [(Int64(0), Int64(0)), (Int64.max / 2, Int64.max - 1)] {
            let settings = FrontendSettings(clientTimeout: client, serverTimeout: backend)
            let (engine, listening) = try startEngine(
                [Frontend(name: "idle", listen: loopbackAnyPort, backends: [Backend(server.address)], settings: settings)])
            let fd = try TestSocket.connect(listening["idle"]!)
            defer { close(fd) }
            usleep(300_000)
            try TestSocket.sendAll(fd, Array("GET / HTTP/1.0\r\n\r\n".utf8))
            let answer = String(decoding: try TestSocket.receiveAll(fd), as: UTF8.self)
            XCTAssertTrue(answer.hasSuffix("I'm patient\n"), "timeouts \(client)/\(backend): \(answer.debugDescription)")
            XCTAssertEqual(engine.statistics().frontends["idle"]?.traffic.timeouts, 0)
        }
    }
}
