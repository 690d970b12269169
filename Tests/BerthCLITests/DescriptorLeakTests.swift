import CBerthShims
import Foundation
import Glibc
import Synchronization
import XCTest

/// Acceptance item 7: after a test's connections have all closed, Berth holds exactly the
/// descriptors it held before them, whatever way the connections ended (complete, reset by the
/// client, timed out, closed while connecting, retried after a refused backend, half-closed).
///
/// How the splice pool is accounted for: Berth keeps up to 64 empty pipes per worker for reuse,
/// so "pipe fds before == after" would be wrong. With one worker, the test first *fills* the pool:
/// 72 connections that each hold a pipe at the same moment (their clients do not read, so every
/// pipe has bytes stuck in it), then read to the end, so that 72 empty pipes come back and exactly
/// 64 stay. After that the worker holds exactly 128 pipe ends, and it must hold exactly 128 again
/// after every round of traffic followed by the same fill: a pipe that leaked (lent and never given
/// back, or given back while its ends were closed elsewhere) shows up as more than 128. Sockets and
/// every other descriptor (epoll, eventfd, stdio) must match the baseline exactly. The copy relay
/// uses no pipes at all, so there the whole count must return to the baseline.
final class DescriptorLeakTests: BerthTestCase {
    static let idlePipesPerWorker = 64

    func testNoDescriptorLeakWithSpliceRelay() throws {
        let (proxy, backend) = try startLeakSetup(relay: "splice", workers: 1)
        let baseline = ProcessProbe.descriptors(proxy.pid)
        print("splice, 1 worker, at start: \(baseline)")
        XCTAssertEqual(baseline.pipes, 0)

        try fillPipePool(proxy)
        let filled = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
        print("splice: after filling the pipe pool: \(filled)")
        XCTAssertEqual(filled.pipes, 2 * Self.idlePipesPerWorker, "the pool keeps exactly 64 idle pipes")
        for round in 1...2 {
            try trafficRound(proxy, backend)
            let afterTraffic = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
            try fillPipePool(proxy)
            let afterFill = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
            print("splice round \(round): after traffic \(afterTraffic); after refilling the pool \(afterFill)")
            XCTAssertEqual(afterTraffic.sockets, baseline.sockets, "round \(round): sockets back to the baseline")
            XCTAssertEqual(afterTraffic.other, baseline.other, "round \(round): epoll/eventfd/stdio unchanged")
            XCTAssertLessThanOrEqual(afterTraffic.pipes, 2 * Self.idlePipesPerWorker, "round \(round): pipes within the pool bound")
            XCTAssertEqual(afterFill.pipes, 2 * Self.idlePipesPerWorker, "round \(round): no pipe leaked (pool of 64 plus nothing)")
            XCTAssertEqual(afterFill.sockets, baseline.sockets)
            XCTAssertEqual(afterFill.other, baseline.other)
        }
        XCTAssertTrue(proxy.process.isRunning)
    }

    func testNoDescriptorLeakWithCopyRelay() throws {
        let (proxy, backend) = try startLeakSetup(relay: "copy", workers: 2)
        let baseline = ProcessProbe.descriptors(proxy.pid)
        print("copy, 2 workers, at start: \(baseline)")
        for round in 1...2 {
            try trafficRound(proxy, backend)
            let after = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
            print("copy round \(round): after traffic \(after)")
            XCTAssertEqual(after, baseline, "round \(round): every descriptor back to the baseline")
        }
        XCTAssertTrue(proxy.process.isRunning)
    }

    /// `--relay auto` switches a direction from copy to splice after a large read: one round of
    /// traffic, then sockets and other fds exactly back, pipes within the pool bound.
    func testNoDescriptorLeakWithAutoRelay() throws {
        let (proxy, backend) = try startLeakSetup(relay: "auto", workers: 1)
        let baseline = ProcessProbe.descriptors(proxy.pid)
        try trafficRound(proxy, backend)
        let after = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
        print("auto, 1 worker: \(baseline) → after traffic \(after)")
        XCTAssertEqual(after.sockets, baseline.sockets)
        XCTAssertEqual(after.other, baseline.other)
        XCTAssertLessThanOrEqual(after.pipes, 2 * Self.idlePipesPerWorker)
        XCTAssertTrue(proxy.process.isRunning)
    }

    /// Every backend refuses: each client is closed at once after the retries, and nothing stays.
    func testRefusedBackendsCloseClientsWithoutLeak() throws {
        var dead: [String] = []
        for _ in 0..<2 {
            let fd = TestSocket.makeSocket("127.0.0.1")
            XCTAssertEqual(TestSocket.withAddress("127.0.0.1", 0) { Glibc.bind(fd, $0, $1) }, 0)
            sockets.add(fd)
            dead.append("127.0.0.1:\(TestSocket.localPort(fd))")
        }
        let proxy = try startProxy(backends: dead, options: ["--workers", "2", "--retries", "3"])
        let baseline = ProcessProbe.descriptors(proxy.pid)
        var endings: [TestSocket.Ending] = []
        let started = now()
        for _ in 0..<50 {
            let fd = try connect(proxy.port)
            TestSocket.sendAll(fd, "hello")
            endings.append(TestSocket.waitForClose(fd, timeout: 3))
            sockets.close(fd)
        }
        let after = try settledDescriptors(proxy.pid, sockets: baseline.sockets)
        print(String(format: "all backends refusing: 50 clients closed in %.2f s (%d FIN, %d RST); berth %@ → %@",
                     now() - started, endings.count { $0 == .closed }, endings.count { $0 == .reset },
                     "\(baseline)", "\(after)"))
        XCTAssertTrue(endings.allSatisfy { $0 == .closed || $0 == .reset }, "every client is closed at once: \(Set(endings))")
        XCTAssertEqual(after, baseline)
        XCTAssertTrue(proxy.process.isRunning)
    }

    // MARK: Set-up and measurement

    /// A scripted backend, plus a dead one first in the rotation (a port bound but not listening:
    /// connects are refused and retried), and berth with short idle timeouts.
    private func startLeakSetup(relay: String, workers: Int) throws -> (ListeningChild, TestBackend) {
        let backend = try startBackend(.scripted)
        let dead = TestSocket.makeSocket("127.0.0.1")
        XCTAssertTrue(TestSocket.withAddress("127.0.0.1", 0) { Glibc.bind(dead, $0, $1) } == 0)
        sockets.add(dead)
        let deadAddress = "127.0.0.1:\(TestSocket.localPort(dead))"
        let proxy = try startProxy(
            backends: [deadAddress, backend.address],
            options: ["--workers", "\(workers)", "--relay", relay, "--retries", "3",
                      "--client-timeout", "3s", "--server-timeout", "3s"])
        return (proxy, backend)
    }

    /// Waits (up to 10 s) until berth holds no more sockets than `sockets`, then counts.
    private func settledDescriptors(_ pid: pid_t, sockets: Int) throws -> ProcessProbe.Descriptors {
        let started = now()
        var census = ProcessProbe.descriptors(pid)
        while census.sockets > sockets && now() - started < 10 {
            sleep(seconds: 0.05)
            census = ProcessProbe.descriptors(pid)
        }
        sleep(seconds: 0.1)  // a pipe is released in the same loop turn as its session's sockets
        return ProcessProbe.descriptors(pid)
    }

    /// Makes 72 sessions hold a pipe at the same moment, then lets them all finish cleanly.
    ///
    /// A pipe stays lent only while it holds bytes its destination cannot take. The client's
    /// receive window is tiny, but berth's send buffer toward it grows up to net.ipv4.tcp_wmem's
    /// maximum (4 MiB by default), so each backend sends that much plus 512 KiB: the rest backs up
    /// into the pipe. (About 72 × 4.5 MiB of loopback kernel memory for a second or so.)
    private func fillPipePool(_ proxy: ListeningChild) throws {
        let clients = Self.idlePipesPerWorker + 8
        let sendBufferMaximum = (try? String(contentsOfFile: "/proc/sys/net/ipv4/tcp_wmem", encoding: .utf8))
            .flatMap { $0.split(whereSeparator: { $0 == "\t" || $0 == " " || $0 == "\n" }).last }.flatMap { Int($0) } ?? 4 << 20
        let total = sendBufferMaximum + 512 << 10
        var fds: [CInt] = []
        for _ in 0..<clients {
            let fd = TestSocket.makeSocket("127.0.0.1")
            var size: CInt = 2048
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<CInt>.size))
            TestSocket.setTimeouts(fd, seconds: 5)
            guard TestSocket.withAddress("127.0.0.1", proxy.port, { Glibc.connect(fd, $0, $1) }) == 0 else {
                Glibc.close(fd)
                throw FixtureError("connect for the pool fill: errno \(errno)")
            }
            sockets.add(fd)
            fds.append(fd)
            TestSocket.sendAll(fd, "SEND \(total) 65536 0\n")
        }
        let started = now()
        var held = ProcessProbe.descriptors(proxy.pid).pipes / 2
        while held < clients && now() - started < 2.5 {
            sleep(seconds: 0.02)
            held = ProcessProbe.descriptors(proxy.pid).pipes / 2
        }
        print(String(format: "pool fill: %d pipes lent at once after %.2f s (%d KiB per client)", held, now() - started, total >> 10))
        XCTAssertGreaterThan(held, Self.idlePipesPerWorker, "pool fill: more pipes lent at once than the pool keeps")
        // Open the windows again so that the drain is quick.
        for fd in fds {
            var size: CInt = 1 << 20
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<CInt>.size))
        }
        let failures = Mutex<[String]>([])
        let draining = now()
        concurrently(clients, timeout: 30) { [fds] index in
            let (bytes, ending) = TestSocket.drain(fds[index], limit: total + 1, timeout: 20)
            if bytes != total || ending != .closed { failures.withLock { $0.append("fill \(index): \(bytes) B, \(ending)") } }
        }
        for fd in fds { sockets.close(fd) }
        print(String(format: "pool fill: %d × %d KiB drained in %.2f s", clients, total >> 10, now() - draining))
        XCTAssertEqual(failures.withLock { $0 }, [], "pool fill transfers")
    }

    // MARK: One round of traffic

    /// 85 connections at once, ending every way a connection can end.
    private func trafficRound(_ proxy: ListeningChild, _ backend: TestBackend) throws {
        let port = proxy.port
        let failures = Mutex<[String]>([])
        let started = now()
        concurrently(85, timeout: 30) { index in
            guard case .success(let fd) = TestSocket.connect(port) else {
                failures.withLock { $0.append("\(index): connect failed") }
                return
            }
            var problem: String?
            switch index {
            case 0..<40:  // complete downloads; the backend closes first
                TestSocket.sendAll(fd, "SEND 262144 65536 0\n")
                let (bytes, ending, intact) = StreamPattern.receive(fd, limit: 262_145, timeout: 10)
                if bytes != 262_144 || ending != .closed || !intact { problem = "download: \(bytes) B, \(ending), intact \(intact)" }
                Glibc.close(fd)
            case 40..<50:  // echo with a half-close from the client
                let payload = Array(StreamPattern.table[0..<100_000])
                TestSocket.sendAll(fd, Array("ECHO\n".utf8) + payload)
                Glibc.shutdown(fd, CInt(SHUT_WR))
                var echoed: [UInt8] = []
                let (_, ending) = TestSocket.drain(fd, limit: 100_001, timeout: 10) { echoed.append(contentsOf: $0); return true }
                if echoed != payload || ending != .closed { problem = "echo: \(echoed.count) B, \(ending)" }
                Glibc.close(fd)
            case 50..<70:  // the client resets mid-transfer
                TestSocket.sendAll(fd, "SEND 0 65536 0\n")
                let (bytes, _) = TestSocket.drain(fd, limit: 65536, timeout: 10)
                if bytes != 65536 { problem = "reset: only \(bytes) B before the reset" }
                TestSocket.closeWithReset(fd)
            case 70..<75:  // idle: closed by --client-timeout/--server-timeout 3s
                TestSocket.sendAll(fd, "HOLD\n")
                let ending = TestSocket.waitForClose(fd, timeout: 6)
                if ending != .closed && ending != .reset { problem = "idle: not closed by the timeout (\(ending))" }
                Glibc.close(fd)
            default:  // the client gives up at once, maybe while berth is still connecting
                TestSocket.closeWithReset(fd)
            }
            if let problem { failures.withLock { $0.append("\(index): \(problem)") } }
        }
        print(String(format: "traffic round: 85 connections in %.2f s, backend accepted %d so far", now() - started, backend.acceptedCount))
        XCTAssertEqual(failures.withLock { $0 }, [], "every connection of the round behaved")
    }
}
