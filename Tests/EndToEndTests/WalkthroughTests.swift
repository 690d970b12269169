import BerthTestSupport
import Foundation
import Glibc
import Synchronization
import XCTest

/// The original docker-discover walkthrough (docs/OPERATIONS.md), automated on one machine: an etcd, two backend
/// hosts (two dockerds, containers published on 127.0.0.2 and 127.0.0.3), each with its own
/// `berth register`, and one `berth discover` serving clients on 127.0.0.4.
final class WalkthroughTests: XCTestCase {
    /// The proxy's address for the whoami service: the client host, the image's port 8000.
    let clientHost = "127.0.0.4"
    let servicePort = 8000

    func testTheSeedsWalkthrough() throws {
        if let reason = DockerFixture.available() { throw XCTSkip(reason) }
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let hostA = try DockerFixture()
        defer { hostA.stop() }
        let hostB = try DockerFixture()
        defer { hostB.stop() }
        let etcdHost = "127.0.0.1:\(etcd.members[0].clientPort)"
        let statsPort = try freeLoopbackPort()

        var processes: [SpawnedProcess] = []
        defer { for process in processes { process.stop() } }
        for (fixture, hostIP) in [(hostA, "127.0.0.2"), (hostB, "127.0.0.3")] {
            processes.append(try SpawnedProcess(BerthBinary.path, ["register", "--ttl", "5s", "--resync", "2s"], environment: [
                "ETCD_HOST": etcdHost, "HOST_IP": hostIP, "DOCKER_HOST": fixture.host,
            ]))
        }
        let discover = try SpawnedProcess(BerthBinary.path, [
            // docker-proxy keeps accepting for a container that was just killed and then says
            // nothing while its connect to the dead container's address waits on ARP (~3 s):
            // response-timeout moves such a connection on after 1 s.
            "discover", "--bind", clientHost, "--workers", "2", "--linger", "1s",
            "--retry-on", "empty-response,response-timeout", "--first-byte-timeout", "1s",
            "--check", "tcp", "--check-interval", "500ms",
        ] + statsArguments(port: statsPort), environment: ["ETCD_HOST": etcdHost])
        processes.append(discover)
        XCTAssertNotNil(waitUntil(timeout: 15) { discover.standardError.contains("watching the registry") }, discover.standardError)
        addTeardownBlock { [weak self] in
            if (self?.testRun?.failureCount ?? 0) > 0 {
                for process in processes { print("--- \(process.command):\n\(process.standardError.suffix(4000))") }
            }
        }

        // 1. One whoami container per backend host: the answers alternate.
        let a1 = try run(on: hostA, ip: "127.0.0.2"), b1 = try run(on: hostB, ip: "127.0.0.3")
        try waitForAnswers(from: [a1, b1])
        let first = try requests(4)
        print("two hosts: \(first)")
        XCTAssertEqual(Set(first), [name(a1), name(b1)])
        XCTAssertEqual(first[0], first[2])
        XCTAssertEqual(first[1], first[3])
        XCTAssertNotEqual(first[0], first[1])

        // 2. Two more on host A: all four answer, in rotation.
        let a2 = try run(on: hostA, ip: "127.0.0.2"), a3 = try run(on: hostA, ip: "127.0.0.2")
        try waitForAnswers(from: [a1, a2, a3, b1])
        let second = try requests(8)
        print("four containers: \(second)")
        XCTAssertEqual(Set(second.prefix(4)), Set([a1, a2, a3, b1].map(name)))
        XCTAssertEqual(Array(second.prefix(4)), Array(second.suffix(4)), "not a rotation: \(second)")

        // 3. Three killed with docker kill while one client makes sequential requests and eight
        //    more make concurrent ones: none fails; the survivor answers everything after.
        let load = ClientLoad(host: clientHost, port: servicePort)
        load.start(sequential: 1, concurrent: 8)
        Thread.sleep(forTimeInterval: 1)
        for (fixture, id) in [(hostA, a1), (hostB, b1), (hostA, a2)] {
            let killed = try fixture.docker(["kill", id])
            XCTAssertEqual(killed.code, 0, killed.error)
        }
        Thread.sleep(forTimeInterval: 3)
        let outcome = load.stop()
        print("during the kills: \(outcome.sequential) sequential and \(outcome.concurrent) concurrent requests, "
              + "\(outcome.cut) cut mid-answer, the slowest \(Int(outcome.slowest * 1000)) ms, failures: \(outcome.failures.prefix(5))")
        XCTAssertEqual(outcome.failures, [], "\(outcome.failures.count) requests failed during the kills")
        // The containers answer in one write: a SIGKILL comes before the answer (the proxy
        // retries it elsewhere, retry-on empty-response) or after it; never in the middle.
        XCTAssertEqual(outcome.cut, 0, "answers cut after their headers")
        XCTAssertGreaterThan(outcome.sequential, 20)
        XCTAssertGreaterThan(outcome.concurrent, 100)
        XCTAssertEqual(Set(try requests(4)), [name(a3)])

        // 4. The stats page tells what happened.
        try checkStatsPage(port: statsPort, alive: name(a3), killed: [a1, a2, b1].map(name))
        _ = etcd
    }

    /// `berth run` on one host: registration, discovery and proxy in one process. Two whoami
    /// containers answer in turn through the service's port; one stopped under a sequential
    /// client costs no request.
    func testBerthRunOnOneHost() throws {
        if let reason = DockerFixture.available() { throw XCTSkip(reason) }
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let host = try DockerFixture()
        defer { host.stop() }
        let bind = "127.0.0.5"
        // As in the walkthrough: between the container's exit and its deregistration, Docker's
        // userland proxy still accepts on its published port and then waits ~3 s on the dead
        // container's address (a full-suite run lost one request to it): response-timeout too.
        let run = try SpawnedProcess(BerthBinary.path, [
            "run", "--bind", bind, "--workers", "1", "--ttl", "5s", "--stats", "off",
            "--retry-on", "empty-response,response-timeout", "--first-byte-timeout", "1s",
        ], environment: ["ETCD_HOST": "127.0.0.1:\(etcd.members[0].clientPort)", "HOST_IP": "127.0.0.1", "DOCKER_HOST": host.host])
        defer { run.stop() }
        addTeardownBlock { [weak self] in
            if (self?.testRun?.failureCount ?? 0) > 0 { print("--- berth run:\n\(run.standardError.suffix(4000))") }
        }
        XCTAssertNotNil(waitUntil(timeout: 15) { run.standardError.contains("watching the registry") }, run.standardError)
        let one = try host.run(), two = try host.run()
        let answers = try waitForRotation(host: bind, expecting: [name(one), name(two)])
        print("berth run: \(answers)")
        XCTAssertNotEqual(answers[0], answers[1])
        XCTAssertEqual(answers[0], answers[2])
        XCTAssertEqual(answers[1], answers[3])

        let load = ClientLoad(host: bind, port: servicePort)
        load.start(sequential: 1, concurrent: 0)
        Thread.sleep(forTimeInterval: 0.5)
        let stopped = try host.docker(["stop", "-t", "5", one])
        XCTAssertEqual(stopped.code, 0, stopped.error)
        Thread.sleep(forTimeInterval: 1)
        let outcome = load.stop()
        print("berth run: \(outcome.sequential) sequential requests around docker stop, failures: \(outcome.failures.prefix(3))")
        XCTAssertEqual(outcome.failures, [])
        XCTAssertEqual(outcome.cut, 0)
        XCTAssertGreaterThan(outcome.sequential, 20)
        XCTAssertEqual(Set(try (0..<4).map { _ in try request(host: bind) }), [name(two)])
        run.signal(SIGTERM)
        XCTAssertTrue(run.waitForExit(timeout: 15), "berth run did not exit on SIGTERM")
        XCTAssertEqual(run.exitCode, 0)
        XCTAssertFalse(try etcd.etcdctl(["get", "--prefix", "/backends/"]).contains(name(two)), "the lease was revoked on SIGTERM")
    }

    /// Waits until every name in `names` answers through host:8000; returns 4 answers in a row.
    func waitForRotation(host: String, expecting names: [String]) throws -> [String] {
        var seen = Set<String>()
        let done = waitUntil(timeout: 20, interval: 0.02) {
            if let answer = try? request(host: host) { seen.insert(answer) }
            return Set(names).isSubset(of: seen)
        }
        if done == nil { throw FixtureFailure("only \(seen.sorted()) answered of \(names)") }
        return try (0..<4).map { _ in try request(host: host) }
    }

    // MARK: - Helpers

    func run(on fixture: DockerFixture, ip: String) throws -> String {
        try fixture.run(publish: [], options: ["-p", "\(ip):0:\(servicePort)"])
    }

    /// The container's hostname, which the test image answers with.
    func name(_ id: String) -> String { String(id.prefix(12)) }

    /// Waits until every container in `ids` has answered through the proxy.
    func waitForAnswers(from ids: [String]) throws {
        var seen = Set<String>()
        let wanted = Set(ids.map(name))
        let done = waitUntil(timeout: 20, interval: 0.02) {
            if let answer = try? request() { seen.insert(answer) }
            return wanted.isSubset(of: seen)
        }
        if done == nil { throw FixtureFailure("only \(seen.sorted()) answered of \(wanted.sorted())") }
    }

    func request(host: String? = nil) throws -> String {
        let body = try HTTPProbe.get(port: servicePort, host: host ?? clientHost, timeout: 3)
        return body.replacingOccurrences(of: "I'm ", with: "").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func requests(_ count: Int) throws -> [String] {
        try (0..<count).map { _ in try request() }
    }

    func statsArguments(port: Int) -> [String] {
        ["--stats", "127.0.0.1:\(port)"]
    }

    func checkStatsPage(port: Int, alive: String, killed: [String]) throws {
        let csv = try HTTPProbe.get(port: port, path: "/;csv")
        let rows = csv.split(separator: "\n").map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
        guard let header = rows.first, let name = header.firstIndex(of: "svname"), let status = header.firstIndex(of: "status"),
              let total = header.firstIndex(of: "stot") else {
            return XCTFail("no HAProxy CSV header: \(csv.prefix(200))")
        }
        let servers = rows.dropFirst().filter { $0.count > status && $0[0] == "whoami" && !["FRONTEND", "BACKEND"].contains($0[name]) }
        print("stats: \(servers.map { "\($0[name]) \($0[status]) \($0[total])" })")
        let up = servers.filter { $0[name].hasPrefix(alive) }
        XCTAssertEqual(up.count, 1, "the survivor is listed: \(servers.map { $0[name] })")
        XCTAssertEqual(up.first?[status], "UP")
        XCTAssertGreaterThan(Int(up.first?[total] ?? "0") ?? 0, 0)
        let frontend = rows.first { $0.count > total && $0[0] == "whoami" && $0[name] == "FRONTEND" }
        XCTAssertGreaterThan(Int(frontend?[total] ?? "0") ?? 0, 100, "the frontend counted the sessions")
        for gone in killed {
            XCTAssertFalse(servers.contains { $0[name].hasPrefix(gone) && $0[status] == "UP" }, "\(gone) still UP")
        }
    }
}

/// Clients through the proxy on their own threads until `stop()`: some sequential (one request
/// after another), some concurrent. Every failure is recorded with its reason.
final class ClientLoad: @unchecked Sendable {
    let host: String
    let port: Int
    private let running = Atomic<Bool>(false)
    private let lock = NSLock()
    private var sequential = 0, concurrent = 0, cut = 0
    /// The longest request, in seconds.
    private var slowest = 0.0
    static let clientTimeout = 6.0
    private var failures: [String] = []
    private var threads: [Thread] = []
    private let finished = DispatchGroup()

    init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    func start(sequential sequentialClients: Int, concurrent concurrentClients: Int) {
        running.store(true, ordering: .relaxed)
        for index in 0..<(sequentialClients + concurrentClients) {
            let isSequential = index < sequentialClients
            finished.enter()
            let thread = Thread { [self] in
                // Bounded: at most 60 s and 100,000 requests per client, whatever happens.
                let deadline = Date().addingTimeInterval(60)
                var count = 0
                while running.load(ordering: .relaxed) && Date() < deadline && count < 100_000 {
                    count += 1
                    do {
                        let started = Date()
                        defer {
                            let took = Date().timeIntervalSince(started)
                            lock.withLock { slowest = max(slowest, took) }
                        }
                        // Longer than the proxy may take by its settings: a request can meet the
                        // three killed containers in turn before their keys and checks take them
                        // out, each costing up to --first-byte-timeout (1 s) before the replay.
                        let body = try HTTPProbe.get(port: port, host: host, timeout: Self.clientTimeout)
                        if body.isEmpty {
                            // Headers, then the end: the container was SIGKILLed between its two
                            // writes. Bytes had reached the client, so no proxy could retry it.
                            lock.withLock { cut += 1 }
                        } else if !body.hasPrefix("I'm ") {
                            record(failure: "unexpected answer \(body.prefix(40).debugDescription)")
                        }
                    } catch {
                        record(failure: "\(error)")
                    }
                    lock.withLock { if isSequential { sequential += 1 } else { concurrent += 1 } }
                    if isSequential { usleep(5_000) }
                }
                finished.leave()
            }
            threads.append(thread)
            thread.start()
        }
    }

    private func record(failure: String) {
        lock.withLock { failures.append(failure) }
    }

    /// `cut`: answers cut after their headers (a backend killed mid-answer).
    func stop() -> (sequential: Int, concurrent: Int, cut: Int, failures: [String], slowest: Double) {
        running.store(false, ordering: .relaxed)
        _ = finished.wait(timeout: .now() + 10)
        return lock.withLock { (sequential, concurrent, cut, failures, slowest) }
    }
}
