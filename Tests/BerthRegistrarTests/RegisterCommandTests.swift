// `berth register` as a process, on the real dockerd and etcd of `DockerRegistrationTests`:
// SIGKILL → keys expire within TTL + 1 s; SIGTERM → gone within 1 s; flags and environment.
import BerthTestSupport
import Foundation
import Glibc
import XCTest


final class RegisterCommandTests: XCTestCase {
    nonisolated(unsafe) static var docker: DockerFixture?
    nonisolated(unsafe) static var etcd: EtcdFixture?
    nonisolated(unsafe) static var setUpFailure: String?

    override class func setUp() {
        super.setUp()
        if let reason = DockerFixture.available() {
            setUpFailure = reason
            return
        }
        do {
            etcd = try EtcdFixture()
            docker = try DockerFixture()
        } catch {
            setUpFailure = "\(error)"
        }
    }

    override class func tearDown() {
        docker?.stop()
        docker = nil
        etcd?.stop()
        etcd = nil
        super.tearDown()
    }

    private var processes: [SpawnedProcess] = []

    override func tearDown() {
        for process in processes { process.stop(grace: 5) }
        processes = []
        if let docker = Self.docker, let ids = try? docker.docker(["ps", "-aq"]).output.split(separator: "\n").map(String.init), !ids.isEmpty {
            _ = try? docker.docker(["rm", "-f"] + ids)
        }
    }

    private func fixtures() throws -> (DockerFixture, EtcdFixture, EtcdReader) {
        if let failure = Self.setUpFailure { throw XCTSkip("no real dockerd/etcd: \(failure)") }
        guard let docker = Self.docker, let etcd = Self.etcd else { throw XCTSkip("fixtures missing") }
        return (docker, etcd, try EtcdReader(etcd))
    }

    private func register(_ arguments: [String], environment: [String: String] = [:]) throws -> SpawnedProcess {
        let process = try SpawnedProcess(BerthBinary.path, ["register"] + arguments, environment: environment)
        processes.append(process)
        return process
    }

    func testSigkillExpiresWithinTTLAndSigtermRevokesAtOnce() async throws {
        let (docker, etcd, gateway) = try fixtures()
        let id = try docker.run()
        let prefix = "/register-kill"
        let arguments = ["--etcd", etcd.endpoints, "--prefix", prefix, "--ttl", "3s", "--static", "db=127.0.0.1:5432"]
        let environment = ["DOCKER_HOST": docker.host]
        let keys = { try await gateway.get(prefix: prefix + "/") }
        let expected: Set<String> = ["\(prefix)/whoami/\(id.prefix(12))", "\(prefix)/db/127.0.0.1:5432"]

        let killed = try register(arguments, environment: environment)
        await assertEventually(timeout: 5, killed.standardError) { Set(try await keys().keys) == expected }
        killed.signal(SIGKILL)
        XCTAssertTrue(killed.waitForExit(timeout: 5))
        let died = monotonicSeconds()
        let expired = await eventually(timeout: 8) { try await keys().isEmpty }
        let took = monotonicSeconds() - died
        XCTAssertNotNil(expired)
        XCTAssertLessThan(took, 4.0, "keys expired \(took) s after SIGKILL with TTL 3 s")

        let terminated = try register(arguments, environment: environment)
        await assertEventually(timeout: 5, terminated.standardError) { Set(try await keys().keys) == expected }
        terminated.signal(SIGTERM)
        let signalled = monotonicSeconds()
        let gone = await eventually(timeout: 3) { try await keys().isEmpty }
        XCTAssertLessThan(gone ?? 99, 1.0, "keys still there \(gone ?? -1) s after SIGTERM")
        XCTAssertTrue(terminated.waitForExit(timeout: 5))
        XCTAssertEqual(terminated.exitCode, 0, terminated.standardError)
        print("register: SIGKILL → keys expired in \(String(format: "%.3f", took)) s (TTL 3 s); SIGTERM → gone in \(String(format: "%.3f", gone ?? -1)) s, exit in \(String(format: "%.3f", monotonicSeconds() - signalled)) s")
    }

    func testEnvironmentOfTheSeedAndSeedCompatValues() async throws {
        let (docker, etcd, gateway) = try fixtures()
        let id = try docker.run()
        let prefix = "/register-seed"
        let process = try register(["--compat", "seed"], environment: [
            "ETCD_HOST": "127.0.0.1:\(etcd.members[0].clientPort)", "BERTH_PREFIX": prefix, "DOCKER_HOST": docker.host, "HOST_IP": "192.0.2.2",
        ])
        let expected = ["\(prefix)/whoami/\(id.prefix(12))": "127.0.0.1:\(try docker.publishedPort(id))", "\(prefix)/whoami/port": "8000"]
        let found = await eventually(timeout: 5) { try await gateway.get(prefix: prefix + "/") == expected }
        let stored = try? await gateway.get(prefix: prefix + "/")
        XCTAssertNotNil(found, "\(String(describing: stored)) \(process.standardError)")
    }

    func testBadFlagsExitWithUsageError() throws {
        for arguments in [["--ttl", "1s"], ["--ttl", "2500ms"], ["--static", "nope"], ["--etcd", "ftp://127.0.0.1:1"], ["--compat", "other"],
                          ["--docker-host", "tcp://1.2.3.4:2375"], ["--prefix", "relative"], ["--resync", "0"]] {
            let result = try SpawnedProcess.run(BerthBinary.path, ["register"] + arguments, timeout: 10)
            XCTAssertEqual(result.code, 64, "\(arguments): \(result.error)")
            XCTAssertEqual(result.error.split(separator: "\n").count, 1, "\(arguments): \(result.error)")
        }
    }
}
