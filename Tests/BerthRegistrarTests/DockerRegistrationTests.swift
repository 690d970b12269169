// Docker registration on a real dockerd and a real etcd (both started once for this class):
// registration timing, stop/kill, 50 containers at once, the naming special cases, etcd and
// dockerd restarts. The registrar runs in this process; `RegisterCommandTests` runs the binary.
@testable import BerthRegistrar
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class DockerRegistrationTests: XCTestCase {
    nonisolated(unsafe) static var docker: DockerFixture?
    nonisolated(unsafe) static var etcd: EtcdFixture?
    nonisolated(unsafe) static var setUpFailure: String?
    nonisolated(unsafe) static var prefixSequence = 0

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

    private var docker: DockerFixture!
    private var etcd: EtcdFixture!
    private var gateway: EtcdReader!
    private var prefix = ""
    private var registrar: Registrar?
    private var task: Task<Void, Error>?

    override func setUp() async throws {
        if let failure = Self.setUpFailure { throw XCTSkip("no real dockerd/etcd: \(failure)") }
        docker = Self.docker
        etcd = Self.etcd
        gateway = try EtcdReader(etcd)
        Self.prefixSequence += 1
        prefix = "/registrar-test-\(Self.prefixSequence)"
    }

    override func tearDown() async throws {
        registrar?.shutdown()
        _ = try? await task?.value
        if let docker, let ids = try? docker.docker(["ps", "-aq"]).output.split(separator: "\n").map(String.init), !ids.isEmpty {
            _ = try? docker.docker(["rm", "-f"] + ids)
        }
    }

    /// Starts an in-process registrar on the real Docker and etcd.
    private func startRegistrar(ttl: Int64 = 3, resync: Duration = .seconds(30), statics: [String] = []) throws {
        let configuration = RegistrarConfiguration(
            layout: RecordLayout(prefix: prefix), ttlSeconds: ttl, resyncInterval: resync,
            statics: try statics.map { try StaticService(parsing: $0).registration }, docker: try DockerClient(host: docker.host))
        let registrar = Registrar(configuration: configuration, store: try makeStore())
        self.registrar = registrar
        task = Task { try await registrar.run() }
    }

    func makeStore() throws -> any RegistrationStore { try EtcdRegistrationStore(endpoints: [etcd.endpoints]) }

    private func keys() async throws -> [String: String] { try await gateway.get(prefix: prefix + "/") }

    private func waitForDocker(_ registrar: Registrar?) async throws {
        let connected = await eventually(timeout: 5) { registrar?.status.dockerConnected == true && registrar?.status.resyncs ?? 0 >= 1 }
        XCTAssertNotNil(connected, "the registrar did not connect to dockerd")
    }

    private func decode(_ value: String?) -> [String: Any] {
        guard let value, let object = try? JSONSerialization.jsonObject(with: Data(value.utf8)) as? [String: Any] else { return [:] }
        return object
    }

    func testTwoContainersAppearWithinOneSecondAndGoOnStopAndKill() async throws {
        try startRegistrar()
        try await waitForDocker(registrar)
        let first = try docker.run()
        let second = try docker.run()
        let started = monotonicSeconds()
        let firstKey = "\(prefix)/whoami/\(first.prefix(12))"
        let secondKey = "\(prefix)/whoami/\(second.prefix(12))"
        let appeared = await eventually(timeout: 3) { let all = try await keys(); return all[firstKey] != nil && all[secondKey] != nil }
        let tookToAppear = monotonicSeconds() - started
        XCTAssertNotNil(appeared)
        XCTAssertLessThan(tookToAppear, 1.0, "keys appeared after \(tookToAppear) s")
        for (id, key) in [(first, firstKey), (second, secondKey)] {
            let value = decode(try await keys()[key])
            XCTAssertEqual(value["host"] as? String, "127.0.0.1")
            XCTAssertEqual(value["port"] as? Int, try docker.publishedPort(id))
            XCTAssertEqual(value["listen"] as? Int, 8000)
            XCTAssertNil(value["draining"], "not draining: the field is left out")
        }
        // The published port on 127.0.0.1 reaches the container (docker-proxy), which answers.
        let answer = try SpawnedProcess.run("curl", ["-s", "-m", "2", "http://127.0.0.1:\(try docker.publishedPort(first))/"], timeout: 5)
        XCTAssertEqual(answer.output.trimmingCharacters(in: .whitespacesAndNewlines), "I'm \(first.prefix(12))")
        let lease = try await gateway.lease(of: firstKey)
        XCTAssertEqual(lease, registrar?.status.leaseID)

        XCTAssertEqual(try docker.docker(["stop", "-t", "5", first]).code, 0)
        let stopped = await eventually(timeout: 3) { try await keys()[firstKey] == nil }
        XCTAssertNotNil(stopped)
        XCTAssertLessThan(stopped ?? 99, 1.0, "key still there \(stopped ?? 99) s after docker stop returned")

        XCTAssertEqual(try docker.docker(["kill", second]).code, 0)
        let killed = await eventually(timeout: 3) { try await keys()[secondKey] == nil }
        XCTAssertLessThan(killed ?? 99, 1.0, "key still there \(killed ?? 99) s after docker kill returned")
        print("registrar: two keys in \(String(format: "%.3f", tookToAppear)) s; stop → gone in \(String(format: "%.3f", stopped ?? -1)) s; kill → gone in \(String(format: "%.3f", killed ?? -1)) s")
    }

    func testPausedContainerIsDrainingUntilUnpaused() async throws {
        try startRegistrar()
        try await waitForDocker(registrar)
        let id = try docker.run()
        let key = "\(prefix)/whoami/\(id.prefix(12))"
        await assertEventually(timeout: 3) { try await keys()[key] != nil }
        XCTAssertEqual(try docker.docker(["pause", id]).code, 0)
        let drained = await assertEventually(timeout: 3, "pause did not drain") { decode(try await keys()[key])["draining"] as? Bool == true }
        XCTAssertEqual(try docker.docker(["unpause", id]).code, 0)
        let restored = await assertEventually(timeout: 3, "unpause did not restore") {
            let value = try await keys()[key]
            return value != nil && decode(value)["draining"] == nil
        }
        XCTAssertLessThan(drained ?? 99, 1.0)
        XCTAssertLessThan(restored ?? 99, 1.0)
    }

    func testUnhealthyContainerIsDrainingUntilHealthyAgain() async throws {
        try startRegistrar()
        try await waitForDocker(registrar)
        let id = try docker.run(options: ["--health-cmd", "test ! -f /tmp/sick", "--health-interval", "500ms", "--health-retries", "1"])
        let key = "\(prefix)/whoami/\(id.prefix(12))"
        await assertEventually(timeout: 3) { try await keys()[key] != nil }
        XCTAssertEqual(try docker.docker(["exec", id, "touch", "/tmp/sick"]).code, 0)
        await assertEventually(timeout: 5, "unhealthy did not drain") { decode(try await keys()[key])["draining"] as? Bool == true }
        XCTAssertEqual(try docker.docker(["exec", id, "rm", "/tmp/sick"]).code, 0)
        await assertEventually(timeout: 5, "healthy again did not restore") {
            let value = try await keys()[key]
            return value != nil && decode(value)["draining"] == nil
        }
    }

    func testFiftyContainersAtOnceAndTheSpecialCases() async throws {
        try startRegistrar()
        try await waitForDocker(registrar)
        // 50 `docker run` at once, plus: no published port, berth.ignore=true, two ports.
        var runs: [SpawnedProcess] = []
        for index in 0..<50 {
            runs.append(try SpawnedProcess("docker", ["-H", docker.host, "run", "-d", "-p", "127.0.0.1:0:8000",
                                                       "--label", "berth.service=bulk", "--name", "bulk\(index)", DockerFixture.image]))
        }
        let noPorts = try docker.run(publish: [])
        let ignored = try docker.run(labels: ["berth.ignore": "true"])
        let twoPorts = try docker.run(publish: [8000, 8001])
        for run in runs {
            XCTAssertTrue(run.waitForExit(timeout: 120), "docker run did not finish")
            XCTAssertEqual(run.exitCode, 0, run.standardError)
        }
        let allStarted = monotonicSeconds()
        let registered = await eventually(timeout: 10) {
            try await keys().keys.filter { $0.hasPrefix("\(prefix)/bulk/") }.count == 50
        }
        let took = monotonicSeconds() - allStarted
        let count = try await keys().count
        XCTAssertNotNil(registered, "not all 50 registered: \(count) keys")
        print("registrar: 50 containers registered \(String(format: "%.3f", took)) s after the last docker run returned")
        XCTAssertLessThan(took, 2.0)

        let all = try await keys()
        XCTAssertFalse(all.keys.contains { $0.contains(noPorts.prefix(12)) }, "a container without published ports was registered")
        XCTAssertFalse(all.keys.contains { $0.contains(ignored.prefix(12)) }, "berth.ignore=true was registered")
        let short = twoPorts.prefix(12)
        let port8000 = decode(all["\(prefix)/whoami-8000/\(short)-8000"])
        let port8001 = decode(all["\(prefix)/whoami-8001/\(short)-8001"])
        XCTAssertEqual(port8000["port"] as? Int, try docker.publishedPort(twoPorts, 8000))
        XCTAssertEqual(port8000["listen"] as? Int, 8000)
        XCTAssertEqual(port8001["port"] as? Int, try docker.publishedPort(twoPorts, 8001))
        XCTAssertEqual(port8001["listen"] as? Int, 8001)
        XCTAssertEqual(all.count, 52, "\(all.keys.sorted())")
        XCTAssertEqual(registrar?.status.registered, 52)

        // Everything removed at once: every key goes.
        let ids = try docker.docker(["ps", "-aq"]).output.split(separator: "\n").map(String.init)
        XCTAssertEqual(try docker.docker(["rm", "-f"] + ids, timeout: 120).code, 0)
        await assertEventually(timeout: 3, "keys left after rm -f") { try await keys().isEmpty }
    }

    func testEtcdRestartedKeysAreBackWithinTwoSeconds() async throws {
        try startRegistrar(statics: ["static=127.0.0.1:9@9"])
        try await waitForDocker(registrar)
        let id = try docker.run()
        let key = "\(prefix)/whoami/\(id.prefix(12))"
        await assertEventually(timeout: 3) { try await keys().count == 2 }

        // The same data: the lease survives the restart.
        try etcd.restart(losingData: false)
        let back = await eventually(timeout: 5) { try await keys().count == 2 }
        XCTAssertLessThan(back ?? 99, 2.0, "keys back after \(back ?? -1) s (data kept)")

        // Data lost: the registrar finds its lease gone, grants a new one and puts every key again.
        try etcd.restart(losingData: true)
        let again = await eventually(timeout: 5) { let all = try await keys(); return all[key] != nil && all.count == 2 }
        XCTAssertLessThan(again ?? 99, 2.0, "keys back after \(again ?? -1) s (data lost)")
        print("registrar: etcd restarted, keys back in \(String(format: "%.3f", back ?? -1)) s (data kept), \(String(format: "%.3f", again ?? -1)) s (data lost)")
    }

    func testDockerdRestartedTheResyncRepairsTheTable() async throws {
        try startRegistrar(resync: .seconds(1))
        try await waitForDocker(registrar)
        let gone = try docker.run()
        let kept = try docker.run(options: ["--restart", "always"])
        let goneKey = "\(prefix)/whoami/\(gone.prefix(12))"
        let keptKey = "\(prefix)/whoami/\(kept.prefix(12))"
        await assertEventually(timeout: 3) { try await keys().count == 2 }

        // dockerd stops its containers and comes back with only the restart=always one (often on a
        // new port); the registrar was cut off meanwhile and must repair both directions.
        try docker.restartDaemon()
        let restarted = monotonicSeconds()
        let repaired = await eventually(timeout: 10) {
            let all = try await keys()
            guard all[goneKey] == nil, let value = all[keptKey] else { return false }
            return decode(value)["port"] as? Int == (try? docker.publishedPort(kept))
        }
        let table = try await keys()
        XCTAssertNotNil(repaired, "table not repaired: \(table)")
        print("registrar: dockerd restarted, table repaired \(String(format: "%.3f", monotonicSeconds() - restarted)) s after it answered")
        XCTAssertGreaterThanOrEqual(registrar?.status.dockerReconnects ?? 0, 1)

        // A key deleted behind the registrar's back is put back by the periodic resync.
        try await gateway.delete(key: keptKey)
        await assertEventually(timeout: 3, "resync did not put the key back") { try await keys()[keptKey] != nil }
    }
}
