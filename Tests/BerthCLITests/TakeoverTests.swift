import BerthSystem
import BerthTestSupport
import Foundation
import Glibc
import Synchronization
import XCTest

/// Restarts that drop nothing (`--takeover-socket`): a second `berth proxy` takes over the
/// first one's listening sockets under a steady load of new connections, while long-lived
/// connections stay open across the switch in the old process until they end.
final class TakeoverTests: BerthTestCase {
    /// Failures seen by clients, by kind.
    struct Failures: Sendable, CustomStringConvertible {
        var refused = 0
        var reset = 0
        var other = 0
        var total: Int { refused + reset + other }
        var description: String { "refused \(refused), reset or cut \(reset), other \(other)" }
    }

    func testProxyReplacedUnderLoadRefusesNothingAndLongLivedConnectionsDrain() throws {
        let backend = try startBackend(.scripted)
        let socketPath = "\(NSTemporaryDirectory())berth-takeover-\(getpid()).sock"
        defer { unlink(socketPath) }
        let takeover = ["--stats", "off", "--takeover-socket", socketPath, "--drain-timeout", "30s"]
        let first = try startProxy(backends: [backend.address], options: ["--workers", "2"] + takeover)
        XCTAssertTrue(first.process.waitForStandardError(containing: "takeover socket", timeout: 10))

        // Long-lived connections, opened before the switch.
        var longLived: [CInt] = []
        for _ in 0..<4 {
            let fd = try connect(first.port)
            XCTAssertTrue(Self.exchange(fd, "ECHO\nbefore\n", expect: "before\n"))
            longLived.append(fd)
        }

        // Steady new connections from two threads, each a complete echo exchange.
        let stop = Atomic<Bool>(false)
        let completed = Atomic<Int>(0)
        let failures = Mutex(Failures())
        let port = first.port
        var threads: [pthread_t] = []
        for index in 0..<2 {
            let thread = OSThread(name: "load-\(index)") {
                let started = now()
                while !stop.load(ordering: .relaxed) && now() - started < 60 {
                    switch TestSocket.connect(port, timeout: 5) {
                    case .failure(let failure):
                        failures.withLock { failure.errno == ECONNREFUSED ? ($0.refused += 1) : ($0.other += 1) }
                    case .success(let fd):
                        if Self.exchange(fd, "ECHO\nhello\n", expect: "hello\n") {
                            completed.add(1, ordering: .relaxed)
                        } else {
                            failures.withLock { $0.reset += 1 }
                        }
                        Glibc.close(fd)
                    }
                    usleep(2_000)
                }
            }
            threads.append(thread.handle)
        }
        defer {
            stop.store(true, ordering: .relaxed)
            for thread in threads { pthread_join(thread, nil) }
        }
        XCTAssertNotNil(waitUntil(timeout: 20) { completed.load(ordering: .relaxed) >= 200 }, "load before the switch")

        // A second process, with another worker count, takes over.
        let second = try launch(BerthBinary.path, ["proxy", "--listen", first.address, "--backend", backend.address, "--workers", "3"] + takeover)
        XCTAssertTrue(second.waitForStandardError(containing: "takeover complete", timeout: 30), "the new process took over")
        XCTAssertTrue(first.process.waitForStandardError(containing: "taken over", timeout: 10), "the old process was told")
        let atSwitch = completed.load(ordering: .relaxed)

        // The old process keeps its long-lived connections working, and waits for them.
        for fd in longLived {
            XCTAssertTrue(Self.exchange(fd, "after\n", expect: "after\n"), "a long-lived connection works after the switch")
        }
        sleep(seconds: 1)
        XCTAssertNil(first.process.poll(), "the old process drains while long-lived connections are open")
        for fd in longLived { sockets.close(fd) }
        XCTAssertEqual(first.process.waitForExit(timeout: 15), .exited(0), "the old process exits once drained")

        // Load continues on the new process alone.
        XCTAssertNotNil(waitUntil(timeout: 20) { completed.load(ordering: .relaxed) >= atSwitch + 200 }, "load after the switch")
        stop.store(true, ordering: .relaxed)
        for thread in threads { pthread_join(thread, nil) }
        threads = []
        let seen = failures.withLock { $0 }
        print("takeover under load: \(completed.load(ordering: .relaxed)) connections completed (\(atSwitch) before the switch); failures: \(seen)")
        XCTAssertEqual(seen.total, 0, "no connection refused or cut: \(seen)")
        XCTAssertNil(second.poll(), "the new process serves on")

        // A third process finds the new one's socket: the chain goes on.
        let third = try launch(BerthBinary.path, ["proxy", "--listen", first.address, "--backend", backend.address, "--workers", "1"] + takeover)
        XCTAssertTrue(third.waitForStandardError(containing: "takeover complete", timeout: 30))
        XCTAssertEqual(second.waitForExit(timeout: 15), .exited(0))
        guard case .success(let fd) = TestSocket.connect(first.port) else { return XCTFail("the third process does not accept") }
        XCTAssertTrue(Self.exchange(fd, "ECHO\nthird\n", expect: "third\n"))
        Glibc.close(fd)
    }

    /// A peer that accepts and never answers, and one that answers garbage: the new process
    /// logs it, starts alone (both serve, SO_REUSEPORT) and the port works.
    func testSilentOrGarbagePeerOnTheSocketStartsAlone() throws {
        let backend = try startBackend(.scripted)
        let socketPath = "\(NSTemporaryDirectory())berth-takeover-bad-\(getpid()).sock"
        defer { unlink(socketPath) }
        for garbage in [nil, "HTTP/1.1 200 OK\r\n\r\n"] {
            var listener = try UnixSockets.listen(path: socketPath)
            let peer = OSThread(name: "bad-peer") { [raw = listener.raw] in
                guard var connection = try? UnixSockets.accept(raw, timeoutMilliseconds: 10_000, peerTimeoutMilliseconds: 10_000) else { return }
                if let garbage { try? UnixSockets.send(connection.raw, Array(garbage.utf8)) }
                sleep(seconds: garbage == nil ? 7 : 0.5)
                connection.close()
            }
            let proxy = try startProxy(backends: [backend.address], options: ["--stats", "off", "--takeover-socket", socketPath])
            XCTAssertTrue(proxy.process.standardError.contains("failed"), "the failed takeover is logged: \(proxy.process.standardError)")
            guard case .success(let fd) = TestSocket.connect(proxy.port) else { return XCTFail("the proxy does not accept") }
            XCTAssertTrue(Self.exchange(fd, "ECHO\nalone\n", expect: "alone\n"))
            Glibc.close(fd)
            peer.join()
            listener.close()
            proxy.process.terminateAndReap()
        }
    }

    /// Sends `text` and reads until `expect` has come back in full.
    static func exchange(_ fd: CInt, _ text: String, expect: String) -> Bool {
        guard TestSocket.sendAll(fd, text) else { return false }
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 256)
        let wanted = Array(expect.utf8)
        let deadline = now() + 10
        while received.count < wanted.count && now() < deadline {
            let count = Glibc.recv(fd, &buffer, buffer.count, 0)
            if count > 0 {
                received += buffer[0..<count]
            } else if count == 0 || (errno != EAGAIN && errno != EINTR) {
                return false
            }
        }
        return received == wanted
    }
}

/// The host's registrations survive a takeover: `berth run` replaced by another `berth run`
/// keeps the keys under the same lease, and a watcher never sees a delete.
final class TakeoverRegistrationTests: BerthTestCase {
    func testRunReplacedKeepsTheKeysUnderTheSameLease() throws {
        let etcd = try EtcdFixture()
        defer { etcd.stop() }
        let whoami = try startWhoami(id: "kept")
        let listen = try freeLoopbackPort()
        let socketPath = "\(NSTemporaryDirectory())berth-takeover-run-\(getpid()).sock"
        defer { unlink(socketPath) }
        let endpoint = etcd.members[0].clientURL
        let watcher = try launch(EtcdFixture.etcdctlPath, ["--endpoints", endpoint, "watch", "--prefix", "/backends/"])
        let arguments = ["run", "--no-docker", "--static", "web=127.0.0.1:\(whoami.port)@\(listen)", "--bind", "127.0.0.1",
                         "--workers", "1", "--stats", "off", "--ttl", "3s", "--takeover-socket", socketPath]
        let environment = ["ETCD_HOST": "127.0.0.1:\(etcd.members[0].clientPort)"]
        let first = try launch(BerthBinary.path, arguments, environment: environment)
        XCTAssertTrue(first.waitForStandardError(containing: "takeover socket", timeout: 15), first.standardError)
        var lease = ""
        XCTAssertNotNil(waitUntil(timeout: 10) {
            lease = Self.leases(try? etcd.etcdctl(["get", "--prefix", "/backends/web/", "-w", "fields"])).first ?? ""
            return !lease.isEmpty
        }, "the first process registered web")
        // Registered is not yet routed: discovery sees the key through its watch, then listens.
        XCTAssertNotNil(waitUntil(timeout: 10) { (try? HTTPProbe.get(port: listen, timeout: 2))?.contains("kept") == true },
                        "the first process never served web: \(first.standardError)")

        let second = try launch(BerthBinary.path, arguments, environment: environment)
        XCTAssertTrue(second.waitForStandardError(containing: "takeover complete", timeout: 30), second.standardError)
        XCTAssertEqual(first.waitForExit(timeout: 15), .exited(0), first.standardError)
        XCTAssertTrue(first.standardError.contains("left to the successor"), first.standardError)
        XCTAssertTrue(second.standardError.contains("lease \(lease) adopted"), second.standardError)

        // Past the TTL (3 s) twice over: the successor keeps the lease alive.
        sleep(seconds: 7)
        let after = Self.leases(try etcd.etcdctl(["get", "--prefix", "/backends/web/", "-w", "fields"]))
        XCTAssertEqual(after, [lease], "the key stays, under the same lease")
        XCTAssertTrue(try HTTPProbe.get(port: listen, timeout: 2).contains("kept"), "the new process serves the port")
        let events = watcher.standardOutput
        print("watch across the takeover:\n\(events)")
        XCTAssertFalse(events.contains("DELETE"), "a watcher saw a delete: \(events)")
        XCTAssertTrue(events.contains("PUT"))

        second.signal(SIGTERM)
        XCTAssertEqual(second.waitForExit(timeout: 15), .exited(0), second.standardError)
        XCTAssertNotNil(waitUntil(timeout: 5) { watcher.standardOutput.contains("DELETE") }, "a plain stop still revokes")
    }

    /// The "Lease" fields of `etcdctl get -w fields`.
    static func leases(_ output: String?) -> [String] {
        (output ?? "").split(separator: "\n").compactMap { line in
            guard line.hasPrefix("\"Lease\" : ") else { return nil }
            let value = String(line.dropFirst("\"Lease\" : ".count))
            return value == "0" ? nil : value
        }
    }
}
