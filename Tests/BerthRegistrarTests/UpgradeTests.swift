// Issue #16's upgrade, as an operator does it: the `--net host` Berth container replaced by a new
// one (`docker run` of the new, then `docker stop` of the old), both with `--takeover-socket` on a
// bind-mounted directory, on a real dockerd and a real etcd, under steady new connections from
// this host and from a second host (a network namespace with a veth on the dockerd's bridge), with
// long-lived connections from the second host open across the switch. Nothing may be refused or
// cut, and etcd must never see a delete of this host's keys.
import BerthTestSupport
import Foundation
import Glibc
import Synchronization
import XCTest

extension ImageTests {
    func testContainerReplacedUnderLoadRefusesNothingAndCutsNothing() throws {
        let (docker, etcd) = try Self.fixtures.require()
        if let reason = NetworkTestBed.unavailableReason() { throw XCTSkip(reason) }
        let binary = ProcessInfo.processInfo.environment["BERTH_IMAGE_BINARY"]
        let built = try SpawnedProcess.run("\(repository)/scripts/image", (binary.map { ["--binary", $0] } ?? ["--debug"]) + ["--tag", Self.image],
                                           environment: ["DOCKER_HOST": docker.host], timeout: 300)
        XCTAssertEqual(built.code, 0, "scripts/image: \(built.output) \(built.error)")
        guard built.code == 0 else { return }

        // The second host: a namespace whose eth0 sits on the dockerd's bridge, in its subnet.
        let remote = try RemoteHost(bridge: docker.bridge)
        defer { remote.remove() }
        let serviceAddress = remote.gateway
        let port = 8000

        // Two whoami containers, then the old Berth container.
        let backends = [try docker.run(), try docker.run()]
        var template = Array("/tmp/berth-upgrade-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw FixtureFailure("mkdtemp: errno \(errno)") }
        let sharedPath = String(cString: made)
        defer { try? FileManager.default.removeItem(atPath: sharedPath) }
        let socket = String(docker.host.dropFirst("unix://".count))
        func startBerth(_ name: String) throws -> String {
            let result = try docker.docker([
                "run", "-d", "--name", name, "--net", "host", "-v", "\(socket):/var/run/docker.sock", "-v", "\(sharedPath):/run/berth",
                "-e", "ETCD_HOST=127.0.0.1:\(etcd.members[0].clientPort)", "-e", "HOST_IP=127.0.0.1",
                "-e", "BERTH_TAKEOVER_SOCKET=/run/berth/takeover.sock",
                Self.image, "run", "--bind", serviceAddress, "--workers", "2", "--ttl", "5s", "--stats", "off", "--drain-timeout", "30s",
            ])
            let id = result.output.trimmingCharacters(in: .whitespacesAndNewlines)
            guard result.code == 0, id.count == 64 else { throw FixtureFailure("docker run \(name): \(result.error)") }
            return id
        }
        let logs = { (id: String) in (try? docker.docker(["logs", id])).map { $0.output + $0.error } ?? "" }
        let old = try startBerth("berth-old")
        let names = Set(backends.map { String($0.prefix(12)) })
        var seen = Set<String>()
        let routed = waitUntil(timeout: 30, interval: 0.05) {
            if let body = try? HTTPProbe.get(port: port, host: serviceAddress, timeout: 2), body.hasPrefix("I'm ") {
                seen.insert(String(body.dropFirst(4).prefix(12)))
            }
            return seen == names
        }
        XCTAssertNotNil(routed, "both containers never answered through \(serviceAddress):\(port): \(seen) \(logs(old))")
        guard routed != nil else { return }
        let leaseBefore = try leases(etcd)
        XCTAssertEqual(leaseBefore.count, 1, "one lease for this host's keys: \(leaseBefore)")

        // A watcher of the registry: it must see no delete.
        let watcher = try SpawnedProcess("/usr/bin/etcdctl", ["--endpoints", "127.0.0.1:\(etcd.members[0].clientPort)", "watch", "--prefix", "/backends/"],
                                         environment: ["ETCDCTL_API": "3"])
        defer { watcher.stop() }

        // Long-lived connections from the second host: half a request sent, the rest after the switch.
        let held = try remote.run { try (0..<4).map { _ in try HeldRequest(host: serviceAddress, port: port) } }
        let local = SteadyLoad(host: serviceAddress, port: port, namespace: nil)
        let fromRemote = SteadyLoad(host: serviceAddress, port: port, namespace: remote.namespace)
        local.start(clients: 3)
        fromRemote.start(clients: 3)
        Thread.sleep(forTimeInterval: 1.5)

        // The upgrade: the new container first; once it has taken over, the old one is stopped.
        let new = try startBerth("berth-new")
        let tookOver = waitUntil(timeout: 30, interval: 0.05) { logs(new).contains("takeover complete") }
        XCTAssertNotNil(tookOver, "the new container never took over: \(logs(new))")
        Thread.sleep(forTimeInterval: 1)
        let stopping = Thread { _ = try? docker.docker(["stop", "-t", "40", old], timeout: 60) }
        stopping.start()
        Thread.sleep(forTimeInterval: 1)
        // The old process is draining now: the held connections it owns must still complete.
        let answers = held.map { $0.finish() }
        Thread.sleep(forTimeInterval: 1.5)
        let localOutcome = local.stop(), remoteOutcome = fromRemote.stop()
        let exited = waitUntil(timeout: 45, interval: 0.1) {
            (try? docker.docker(["inspect", "--format", "{{.State.Status}}", old]).output.hasPrefix("exited")) == true
        }
        let exitCode = (try? docker.docker(["inspect", "--format", "{{.State.ExitCode}}", old]).output)?
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let leaseAfter = try leases(etcd)
        let events = watcher.standardOutput

        print("upgrade: local \(localOutcome.completed) new connections (\(localOutcome.failures.count) failed), "
              + "second host \(remoteOutcome.completed) (\(remoteOutcome.failures.count) failed), "
              + "\(answers.filter { $0 != nil }.count)/\(answers.count) long-lived connections answered after the switch; "
              + "old container exit \(exitCode ?? "?"); lease \(leaseBefore) -> \(leaseAfter); "
              + "watcher saw \(events.components(separatedBy: "PUT").count - 1) put(s), \(events.components(separatedBy: "DELETE").count - 1) delete(s)")
        XCTAssertEqual(localOutcome.failures, [], "new connections from this host failed")
        XCTAssertEqual(remoteOutcome.failures, [], "new connections from the second host failed")
        XCTAssertGreaterThan(localOutcome.completed, 50)
        XCTAssertGreaterThan(remoteOutcome.completed, 50)
        XCTAssertEqual(answers.compactMap { $0 }.filter { names.contains(String($0.dropFirst(4).prefix(12))) }.count, held.count,
                       "long-lived connections cut: \(answers)")
        XCTAssertNotNil(exited, "the old container did not exit: \(logs(old).suffix(2000))")
        XCTAssertEqual(exitCode, "0", logs(old).suffix(2000).description)
        XCTAssertEqual(leaseAfter, leaseBefore, "the keys moved to another lease")
        XCTAssertFalse(events.contains("DELETE"), "a watcher saw this host's keys deleted: \(events)")
        XCTAssertEqual(try (0..<2).map { _ in try HTTPProbe.get(port: port, host: serviceAddress, timeout: 3) }.count, 2)
        if testRun?.failureCount ?? 0 > 0 {
            print("--- old:\n\(logs(old).suffix(3000))\n--- new:\n\(logs(new).suffix(3000))")
        }
    }

    /// The lease ids of the keys under /backends/ (etcdctl's JSON, `"lease":N`).
    private func leases(_ etcd: EtcdFixture) throws -> Set<String> {
        let output = try etcd.etcdctl(["get", "--prefix", "/backends/", "-w", "json"])
        var found = Set<String>()
        var rest = Substring(output)
        while let range = rest.range(of: "\"lease\":") {
            rest = rest[range.upperBound...]
            found.insert(String(rest.prefix { $0.isNumber }))
        }
        return found
    }
}

/// A host of its own: a network namespace with `lo` and an `eth0` on `bridge`, at `.250` of the
/// bridge's /24 (the bridge's own address, `gateway`, is the machine's side).
final class RemoteHost: @unchecked Sendable {
    let namespace: String
    let gateway: String
    private let hostLink: String

    init(bridge: String) throws {
        let shown = try SpawnedProcess.run("ip", ["-4", "-o", "addr", "show", "dev", bridge], timeout: 10).output
        guard let field = shown.split(separator: " ").first(where: { $0.contains("/24") }) else {
            throw FixtureFailure("no /24 on \(bridge): \(shown)")
        }
        gateway = String(field.split(separator: "/")[0])
        let subnet = gateway.split(separator: ".").prefix(3).joined(separator: ".")
        let tag = String(UInt32.random(in: 0..<0xffffff), radix: 16)
        namespace = "berth-\(getpid())-upgrade-\(tag)"
        hostLink = "vu\(tag)"
        let peer = "vp\(tag)"
        let steps: [[String]] = [
            ["netns", "add", namespace],
            ["link", "add", hostLink, "type", "veth", "peer", "name", peer],
            ["link", "set", peer, "netns", namespace],
            ["link", "set", hostLink, "master", bridge, "up"],
            ["-n", namespace, "link", "set", "lo", "up"],
            ["-n", namespace, "link", "set", peer, "name", "eth0"],
            ["-n", namespace, "addr", "add", "\(subnet).250/24", "dev", "eth0"],
            ["-n", namespace, "link", "set", "eth0", "up"],
        ]
        for step in steps {
            let result = try SpawnedProcess.run("ip", step, timeout: 10)
            if result.code != 0 {
                remove()
                throw FixtureFailure("ip \(step.joined(separator: " ")): \(result.error)")
            }
        }
    }

    func run<T>(_ body: () throws -> T) throws -> T {
        try NetworkTestBed.withNetworkNamespace(namespace, body)
    }

    func remove() {
        _ = try? SpawnedProcess.run("ip", ["link", "del", hostLink], timeout: 10)
        _ = try? SpawnedProcess.run("ip", ["netns", "del", namespace], timeout: 10)
    }
}

/// A request sent in two halves: the request line now, the end of its head on `finish()`; the
/// connection stays open (and idle) in between. `finish` returns the body, or nil.
final class HeldRequest: @unchecked Sendable {
    private var socket: CInt

    init(host: String, port: Int) throws {
        socket = try HTTPProbe.connect(port: port, host: host, timeout: 10)
        guard send("GET / HTTP/1.0\r\n") else {
            close(socket)
            throw FixtureFailure("send to \(host):\(port): errno \(errno)")
        }
    }

    deinit { if socket >= 0 { close(socket) } }

    private func send(_ text: String) -> Bool {
        let bytes = Array(text.utf8)
        return Glibc.send(socket, bytes, bytes.count, Int32(MSG_NOSIGNAL)) == bytes.count
    }

    /// Sends the rest of the head; the body that comes back before the close, or nil.
    func finish() -> String? {
        defer {
            close(socket)
            socket = -1
        }
        guard send("Host: upgrade\r\n\r\n") else { return nil }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while response.count < 1 << 20 {
            let got = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
            if got < 0 && errno == EINTR { continue }
            if got <= 0 { break }
            response += buffer[0..<got]
        }
        let text = String(decoding: response, as: UTF8.self)
        guard let split = text.range(of: "\r\n\r\n") else { return nil }
        return String(text[split.upperBound...])
    }
}

/// New connections one after another on `clients` threads until `stop()`, in `namespace` when
/// given (the second host). Bounded: 60 s and 100,000 requests per client.
final class SteadyLoad: @unchecked Sendable {
    let host: String
    let port: Int
    let namespace: String?
    private let running = Atomic<Bool>(false)
    private let lock = NSLock()
    private var completed = 0
    private var failures: [String] = []
    private let finished = DispatchGroup()

    init(host: String, port: Int, namespace: String?) {
        self.host = host
        self.port = port
        self.namespace = namespace
    }

    func start(clients: Int) {
        running.store(true, ordering: .relaxed)
        for _ in 0..<clients {
            finished.enter()
            Thread { [self] in
                defer { finished.leave() }
                do {
                    if let namespace {
                        try NetworkTestBed.withNetworkNamespace(namespace) { loop() }
                    } else {
                        loop()
                    }
                } catch {
                    lock.withLock { failures.append("\(error)") }
                }
            }.start()
        }
    }

    private func loop() {
        let deadline = monotonicSeconds() + 60
        var count = 0
        while running.load(ordering: .relaxed) && monotonicSeconds() < deadline && count < 100_000 {
            count += 1
            do {
                let body = try HTTPProbe.get(port: port, host: host, timeout: 3)
                if body.hasPrefix("I'm ") {
                    lock.withLock { completed += 1 }
                } else {
                    lock.withLock { failures.append("answer \(body.prefix(40).debugDescription)") }
                }
            } catch {
                lock.withLock { failures.append("\(error)") }
            }
            usleep(2_000)
        }
    }

    func stop() -> (completed: Int, failures: [String]) {
        running.store(false, ordering: .relaxed)
        _ = finished.wait(timeout: .now() + 15)
        return lock.withLock { (completed, failures) }
    }
}
