import BerthSystem
import Glibc
import Synchronization
import XCTest

/// Acceptance item 3: SIGTERM stops accepting, lets open transfers finish intact, and exits 0
/// as soon as they are done; `--drain-timeout` bounds how long that may take.
final class ShutdownTests: BerthTestCase {
    /// What one downloading client saw.
    struct Download: Sendable {
        var bytes = 0
        var intact = true
        var ending = TestSocket.Ending.timedOut
        var finishedAt = 0.0
    }

    func testSigtermUnderLoadDrainsTransfersRefusesNewConnectionsAndExitsZero() throws {
        let backend = try startBackend(.scripted)
        let proxy = try startProxy(backends: [backend.address], options: ["--workers", "2", "--drain-timeout", "30s"])
        // Each client downloads 24 chunks of 32 KiB, one every 100 ms: about 2.4 s per transfer.
        let clients = 8
        let chunk = 32 * 1024
        let total = 24 * chunk
        let progress = Mutex([Int](repeating: 0, count: clients))
        let results = Mutex([Download](repeating: Download(), count: clients))
        let finished = Atomic<Int>(0)
        let port = proxy.port
        var threads: [pthread_t] = []
        for index in 0..<clients {
            let thread = OSThread(name: "download-\(index)") {
                var download = Download()
                if case .success(let fd) = TestSocket.connect(port),
                   TestSocket.sendAll(fd, "SEND \(total) \(chunk) 100\n") {
                    (download.bytes, download.ending, download.intact) = StreamPattern.receive(fd, limit: total + 1, timeout: 20) { offset in
                        progress.withLock { $0[index] = offset }
                    }
                    download.finishedAt = now()
                    Glibc.close(fd)
                }
                results.withLock { $0[index] = download }
                finished.add(1, ordering: .relaxed)
            }
            threads.append(thread.handle)
        }
        defer { for thread in threads { pthread_join(thread, nil) } }

        // Mid-transfer: every client has some bytes and none has all.
        let started = now()
        while now() - started < 5 && progress.withLock({ $0.contains { $0 < 2 * chunk } }) { sleep(seconds: 0.01) }
        let before = progress.withLock { $0 }
        print("at SIGTERM: client bytes \(before) of \(total) each")
        XCTAssertTrue(before.allSatisfy { $0 >= 2 * chunk && $0 < total }, "every client is mid-transfer")

        let signalled = now()
        proxy.process.signal(SIGTERM)
        XCTAssertTrue(proxy.process.waitForStandardError(containing: "stopping", timeout: 2), "berth logs the signal")
        sleep(seconds: 0.1)

        // New connections are refused (or, at worst, closed at once without reaching a backend).
        let acceptedBefore = backend.acceptedCount
        var refused = 0
        for _ in 0..<5 {
            switch TestSocket.connect(port, timeout: 1) {
            case .failure(let failure):
                XCTAssertEqual(failure.errno, ECONNREFUSED, "a new connection during the drain")
                refused += 1
            case .success(let fd):
                TestSocket.sendAll(fd, "HOLD\n")
                let ending = TestSocket.waitForClose(fd, timeout: 1)
                Glibc.close(fd)
                XCTAssertTrue(ending == .closed || ending == .reset, "a connection accepted during the drain was not closed at once")
            }
        }
        print("new connections during the drain: \(refused) of 5 refused outright")
        XCTAssertEqual(backend.acceptedCount, acceptedBefore, "no new connection reached the backend after SIGTERM")

        // Berth keeps running while transfers run, and exits 0 right after the last one ends.
        var exitedAt: Double?
        var termination: Termination?
        let deadline = now() + 20
        while now() < deadline && (finished.load(ordering: .relaxed) < clients || termination == nil) {
            if termination == nil, let ended = proxy.process.poll() {
                termination = ended
                exitedAt = now()
            }
            sleep(seconds: 0.005)
        }
        let downloads = results.withLock { $0 }
        let lastFinish = downloads.map(\.finishedAt).max() ?? 0
        print("downloads: \(downloads.map { "\($0.bytes)B \($0.ending)\($0.intact ? "" : " CORRUPT")" })")
        print(String(format: "SIGTERM → last transfer done %.2f s; → exit %.2f s (%@), %.0f ms after the last transfer",
                     lastFinish - signalled, (exitedAt ?? .nan) - signalled, termination?.description ?? "running",
                     ((exitedAt ?? .nan) - lastFinish) * 1000))
        for (index, download) in downloads.enumerated() {
            XCTAssertEqual(download.bytes, total, "client \(index) got every byte")
            XCTAssertTrue(download.intact, "client \(index): bytes intact")
            XCTAssertEqual(download.ending, .closed, "client \(index) ended with a clean close")
        }
        XCTAssertEqual(termination, .exited(0))
        if let exitedAt {
            XCTAssertGreaterThanOrEqual(exitedAt, lastFinish - 0.05, "berth exited before the transfers finished")
            XCTAssertLessThan(exitedAt - lastFinish, 1.0, "berth exits promptly once the last transfer is done")
        }
        XCTAssertTrue(proxy.process.standardError.contains("stopped"), proxy.process.standardError)
    }

    func testDrainTimeoutClosesIdleConnectionAndExitsZero() throws {
        let backend = try startBackend(.scripted)
        let proxy = try startProxy(backends: [backend.address], options: ["--workers", "2", "--drain-timeout", "1s"])
        let fd = try connect(proxy.port)
        XCTAssertTrue(TestSocket.sendAll(fd, "HOLD\n"))
        let started = now()
        while backend.openCount < 1 && now() - started < 5 { sleep(seconds: 0.01) }
        XCTAssertEqual(backend.openCount, 1, "the idle connection reached the backend")
        sleep(seconds: 0.2)

        let signalled = now()
        proxy.process.signal(SIGTERM)
        let ending = TestSocket.waitForClose(fd, timeout: 5)
        let closedAfter = now() - signalled
        let termination = proxy.process.waitForExit(timeout: 5)
        let exitedAfter = now() - signalled
        print(String(format: "drain-timeout 1s: idle connection %@ after %.2f s; berth %@ after %.2f s",
                     "\(ending)", closedAfter, termination?.description ?? "running", exitedAfter))
        XCTAssertTrue(ending == .closed || ending == .reset, "the idle connection is closed by the drain timeout, got \(ending)")
        XCTAssertGreaterThan(closedAfter, 0.8, "not closed before the drain timeout")
        XCTAssertLessThan(closedAfter, 2.5, "closed at the drain timeout")
        XCTAssertEqual(termination, .exited(0))
        XCTAssertLessThan(exitedAfter, 3.0, "exits right after the drain timeout")
        sockets.close(fd)
    }

    /// A second signal during the drain ends it at once (documented in ProxyCommand).
    func testSecondSignalEndsTheDrain() throws {
        let backend = try startBackend(.scripted)
        let proxy = try startProxy(backends: [backend.address], options: ["--workers", "1", "--drain-timeout", "30s"])
        let fd = try connect(proxy.port)
        XCTAssertTrue(TestSocket.sendAll(fd, "HOLD\n"))
        let started = now()
        while backend.openCount < 1 && now() - started < 5 { sleep(seconds: 0.01) }
        proxy.process.signal(SIGTERM)
        XCTAssertTrue(proxy.process.waitForStandardError(containing: "stopping", timeout: 2))
        XCTAssertNil(proxy.process.waitForExit(timeout: 0.5), "the first signal waits for the open connection")
        proxy.process.signal(SIGINT)
        let termination = proxy.process.waitForExit(timeout: 3)
        print("second signal: berth \(termination?.description ?? "still running") after \(String(format: "%.2f", now() - started)) s")
        XCTAssertNotNil(termination, "the second signal ends berth at once")
        XCTAssertEqual(TestSocket.waitForClose(fd, timeout: 2) == .timedOut, false, "the client sees the end")
    }
}
