import BerthSystem
import Glibc
import Synchronization
import XCTest

/// Acceptance item 6: a backend that sends without end to a client that reads 1 KiB/s must not
/// make Berth buffer (its RSS stays flat: the kernel's socket buffers and one pipe or one chunk
/// hold the backlog, and the backend is throttled by TCP), must not make it spin, and must not
/// slow down another connection of the same process.
final class BackPressureTests: BerthTestCase {
    static let residentGrowthBoundKiB = 8 * 1024
    static let downloadBytes = 50 * 1024 * 1024

    func testSlowReaderWithSpliceRelay() throws {
        try checkSlowReader(relay: "splice")
    }

    func testSlowReaderWithCopyRelay() throws {
        try checkSlowReader(relay: "copy")
    }

    /// Samples a process's RSS every 20 ms on its own thread; keeps the highest value.
    final class ResidentSampler {
        private final class Shared: Sendable {
            let highest = Atomic<Int>(0)
            let stopping = Atomic<Bool>(false)
        }

        private let shared = Shared()
        private let thread: OSThread
        private var joined = false

        init(pid: pid_t) {
            thread = OSThread(name: "rss-sampler") { [shared] in
                for _ in 0..<3000 where !shared.stopping.load(ordering: .relaxed) {
                    let value = ProcessProbe.statusKiB(pid, "VmRSS")
                    if value > shared.highest.load(ordering: .relaxed) { shared.highest.store(value, ordering: .relaxed) }
                    usleep(20_000)
                }
            }
        }

        func stop() -> Int {
            shared.stopping.store(true, ordering: .relaxed)
            if !joined { thread.join() }
            joined = true
            return shared.highest.load(ordering: .relaxed)
        }
    }

    private func checkSlowReader(relay: String) throws {
        let backend = try startBackend(.scripted)
        let proxy = try startProxy(backends: [backend.address], options: ["--workers", "2", "--relay", relay])
        let pid = proxy.pid
        // Warm up both workers' buffers and pools with a few small transfers.
        for _ in 0..<8 {
            let fd = try connect(proxy.port)
            TestSocket.sendAll(fd, "SEND 1000000 65536 0\n")
            XCTAssertEqual(TestSocket.drain(fd, timeout: 10).bytes, 1_000_000)
            sockets.close(fd)
        }
        sleep(seconds: 0.2)
        let residentStart = ProcessProbe.residentKiB(pid)
        let sampler = ResidentSampler(pid: pid)
        defer { _ = sampler.stop() }

        // The slow reader: 1 KiB per second for 6 s from an endless stream.
        let slow = try connect(proxy.port)
        XCTAssertTrue(TestSocket.sendAll(slow, "SEND 0 65536 0\n"))
        let progress = SlowProgress()
        let slowReader = OSThread(name: "slow-reader") { [progress] in
            let origin = now()
            for second in 0..<6 {
                let (count, _) = TestSocket.drain(slow, limit: 1024, timeout: 2) { bytes in
                    if !StreamPattern.check(bytes, at: progress.bytes.load(ordering: .relaxed)) {
                        progress.intact.store(false, ordering: .relaxed)
                    }
                    progress.bytes.add(bytes.count, ordering: .relaxed)
                    return true
                }
                if count < 1024 { return }
                sleep(seconds: origin + Double(second + 1) - now())
            }
        }
        defer { slowReader.join() }

        // While only the slow reader runs, berth must sit idle (no spinning on a full pipe/socket).
        sleep(seconds: 1.0)
        let idleCPU = ProcessProbe.cpuShare(pid, over: 1.0)

        // Meanwhile a normal client downloads 50 MB through the same process.
        let total = Self.downloadBytes
        let downloader = try connect(proxy.port)
        let downloadStart = now()
        let ticksBefore = ProcessProbe.cpuTicks(pid)
        XCTAssertTrue(TestSocket.sendAll(downloader, "SEND \(total) 65536 0\n"))
        let (received, ending, intact) = StreamPattern.receive(downloader, limit: total + 1, timeout: 60)
        let downloadTime = now() - downloadStart
        let downloadCPU = Double(ProcessProbe.cpuTicks(pid) - ticksBefore) / Double(sysconf(CInt(_SC_CLK_TCK)))
        sockets.close(downloader)

        // Let the slow reader finish its ~6 s.
        let waitStart = now()
        while progress.bytes.load(ordering: .relaxed) < 6 * 1024 && now() - waitStart < 8 { sleep(seconds: 0.05) }
        let peak = sampler.stop()
        let growth = peak - residentStart
        let speed = Double(received) / downloadTime / 1e6
        print("""
            relay \(relay): slow reader got \(progress.bytes.load(ordering: .relaxed)) B in ~6 s; berth CPU while it waited \
            \(String(format: "%.1f", idleCPU * 100))% of a core
            relay \(relay): 50 MB download alongside: \(received) B in \(String(format: "%.2f", downloadTime)) s \
            (\(String(format: "%.0f", speed)) MB/s), \(ending); berth CPU \(String(format: "%.2f", downloadCPU)) s
            relay \(relay): berth RSS \(residentStart) KiB → peak \(peak) KiB (growth \(growth) KiB, bound \(Self.residentGrowthBoundKiB) KiB)
            """)
        XCTAssertEqual(received, total, "the parallel download is complete")
        XCTAssertEqual(ending, .closed)
        XCTAssertTrue(intact, "the parallel download is intact")
        XCTAssertLessThan(downloadTime, 30, "the parallel download is not starved by the slow reader")
        XCTAssertGreaterThanOrEqual(progress.bytes.load(ordering: .relaxed), 6 * 1024, "the slow reader kept getting bytes")
        XCTAssertTrue(progress.intact.load(ordering: .relaxed), "the slow reader's bytes are intact")
        XCTAssertLessThan(idleCPU, 0.2, "berth does not spin while the slow client's buffers are full")
        XCTAssertGreaterThan(peak, 0)
        XCTAssertLessThan(growth, Self.residentGrowthBoundKiB, "RSS stays bounded under back-pressure")
        XCTAssertTrue(proxy.process.isRunning)
    }
}

/// What the slow reader has read so far (written by its thread, read by the test).
private final class SlowProgress: Sendable {
    let bytes = Atomic<Int>(0)
    let intact = Atomic<Bool>(true)
}
