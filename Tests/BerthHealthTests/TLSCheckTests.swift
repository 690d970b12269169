import BerthEngine
import BerthSystem
import BerthHealth
import Foundation
import XCTest

/// TLS checks against Debian's `openssl s_server` with certificates made by the test.
final class TLSCheckTests: XCTestCase {
    private var directory: URL!
    private var processes: [Process] = []
    private var checker: HealthChecker!

    override func setUpWithError() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("berth-tls-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        checker = try HealthChecker()
    }

    override func tearDown() {
        checker.stop()
        for process in processes where process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: directory)
    }

    @discardableResult
    private func run(_ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
        process.arguments = arguments
        process.currentDirectoryURL = directory
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    /// A self-signed certificate for `name`, as `name.pem` / `name.key`.
    private func certificate(_ name: String) throws {
        let process = try run(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                               "-keyout", "\(name).key", "-out", "\(name).pem",
                               "-subj", "/CN=\(name)", "-addext", "subjectAltName=DNS:\(name)"])
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0, "openssl req")
    }

    private func tlsServer(_ name: String) throws -> SocketAddress {
        let port = try freePort()
        let process = try run(["s_server", "-accept", "127.0.0.1:\(port)", "-cert", "\(name).pem", "-key", "\(name).key",
                               "-quiet", "-naccept", "1000"])
        processes.append(process)
        let address = try SocketAddress(parsing: "127.0.0.1:\(port)")
        _ = waitFor(timeout: 5) { (try? fetchTCP(address)) != nil }
        return address
    }

    private func verdict(_ address: SocketAddress, _ tls: TLSCheck, name: String) -> BackendHealth? {
        let key = BackendKey(frontend: "f", backend: name)
        let settings = CheckSettings(kind: .tls(tls), interval: 100, timeout: 2000, rise: 1, fall: 1)
        checker.update([CheckTarget(key: key, address: address, settings: settings, initialState: .up)])
        _ = waitFor(timeout: 8) { checker.health()[key]?.lastResult != nil }
        return checker.health()[key]
    }

    func testTLSCheckWithAndWithoutVerification() throws {
        try certificate("backend.test")
        try certificate("other.test")
        let address = try tlsServer("backend.test")
        let right = directory.appendingPathComponent("backend.test.pem").path
        let wrong = directory.appendingPathComponent("other.test.pem").path

        let unverified = verdict(address, TLSCheck(serverName: "backend.test"), name: "plain")
        XCTAssertEqual(unverified?.status, .up, "\(String(describing: unverified?.lastResult))")

        let wrongCA = verdict(address, TLSCheck(serverName: "backend.test", caFile: wrong), name: "wrong-ca")
        XCTAssertEqual(wrongCA?.status, .down)
        XCTAssertTrue(wrongCA?.lastResult?.detail.contains("certificate verify failed") == true,
                      "\(String(describing: wrongCA?.lastResult?.detail))")

        let rightCA = verdict(address, TLSCheck(serverName: "backend.test", caFile: right), name: "right-ca")
        XCTAssertEqual(rightCA?.status, .up, "\(String(describing: rightCA?.lastResult?.detail))")

        let wrongName = verdict(address, TLSCheck(serverName: "someone.else", caFile: right), name: "wrong-name")
        XCTAssertEqual(wrongName?.status, .down, "the name must be verified along with the chain")
    }

    func testTLSCheckOnAPlainTCPPortFails() throws {
        let plain = try ScriptedServer { .send(Array("SSH-2.0-not-tls\r\n".utf8), thenClose: true) }
        defer { plain.stop() }
        let health = verdict(plain.address, TLSCheck(), name: "plain-tcp")
        XCTAssertEqual(health?.status, .down)
        XCTAssertTrue(health?.lastResult?.detail.hasPrefix("TLS handshake") == true, "\(String(describing: health?.lastResult?.detail))")
    }

    /// A TLS peer that accepts and never answers does not slow traffic: checks run on the
    /// checker's own thread, and the engine's workers never wait for them.
    func testAHangingTLSPeerDoesNotSlowTraffic() throws {
        let hanging = try ScriptedServer { .hang }
        defer { hanging.stop() }
        let backend = try WhoamiServerHandle(identity: "served")
        defer { backend.stop() }
        var configuration = EngineConfiguration()
        configuration.workers = 1
        let router = try HealthRouter.make(
            configuration: configuration,
            // try-all: the whoami backend fails its TLS check (it speaks plain HTTP) and must still serve.
            policy: HealthPolicy(checks: CheckSettings(kind: .tls(TLSCheck()), interval: 50, timeout: 5_000, rise: 1, fall: 1),
                                 allDown: .tryAll))
        defer { router.shutdown(drainTimeout: 0) }
        let listening = try router.apply(RoutingTable(frontends: [
            Frontend(name: "web", listen: try SocketAddress(parsing: "127.0.0.1:0"), backends: [Backend(backend.address)]),
            Frontend(name: "hung", listen: try SocketAddress(parsing: "127.0.0.1:0"), backends: [Backend(hanging.address)]),
        ])).listening
        var slowest = 0.0
        var total = 0.0
        for _ in 0..<200 {
            let start = Date()
            XCTAssertEqual(try fetch(listening["web"]!), "I'm served\n")
            let took = Date().timeIntervalSince(start)
            slowest = max(slowest, took)
            total += took
        }
        print("200 requests while a TLS check hangs: mean \(Int(total / 200 * 1_000_000)) us, slowest \(Int(slowest * 1000)) ms")
        XCTAssertLessThan(slowest, 0.5)
        XCTAssertNil(router.health()[BackendKey(frontend: "hung", backend: hanging.address.description)]?.lastResult,
                     "the hanging check must still be in flight")
    }
}

/// Connects and closes (readiness probe for a server).
func fetchTCP(_ address: SocketAddress) throws {
    close(try connectLoopback(port: address.port))
}
