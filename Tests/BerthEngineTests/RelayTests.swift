import BerthEngine
import BerthSystem
import Foundation
import XCTest

/// Byte integrity and half-close through both relay paths.
final class RelayTests: DataPlaneTestCase {
    /// What a test backend saw, filled by its connection threads.
    final class Observed: @unchecked Sendable {
        private let lock = NSLock()
        private var values: [String: Checksum] = [:]
        private var failures: [String] = []

        func record(_ key: String, _ value: Checksum) {
            lock.lock(); values[key] = value; lock.unlock()
        }
        func fail(_ text: String) {
            lock.lock(); failures.append(text); lock.unlock()
        }
        subscript(key: String) -> Checksum? {
            lock.lock(); defer { lock.unlock() }; return values[key]
        }
        var errors: [String] {
            lock.lock(); defer { lock.unlock() }; return failures
        }
    }

    private func integrity(mode: RelayMode, megabytes: Int = 64) throws {
        let total = megabytes << 20
        let observed = Observed()
        let backend = try TestBackend { fd in
            let sender = Thread {
                do {
                    observed.record("backendSent", try sendStream(fd, total: total, seed: 2))
                    shutdown(fd, CInt(SHUT_WR))
                } catch { observed.fail("backend send: \(error)") }
            }
            sender.start()
            do {
                observed.record("backendReceived", try receiveStream(fd))
            } catch { observed.fail("backend receive: \(error)") }
            while !sender.isFinished { usleep(1000) }
            close(fd)
        }
        addTeardownBlock { backend.stop() }
        let (engine, listening) = try startEngine(
            [Frontend(name: "bulk", listen: loopbackAnyPort, backends: [Backend(backend.address)])],
            configure: { $0.relay = mode })
        let fd = try TestSocket.connect(listening["bulk"]!, timeout: 30)
        let started = Date()
        let clientSent = Thread {
            do {
                observed.record("clientSent", try sendStream(fd, total: total, seed: 1))
                shutdown(fd, CInt(SHUT_WR))
            } catch { observed.fail("client send: \(error)") }
        }
        clientSent.start()
        let received = try receiveStream(fd)
        XCTAssertTrue(eventually(timeout: 30) { clientSent.isFinished })
        close(fd)
        XCTAssertTrue(eventually(timeout: 10) { observed["backendReceived"] != nil })
        XCTAssertEqual(observed.errors, [])
        XCTAssertEqual(received.count, total)
        XCTAssertEqual(received.value, observed["backendSent"]?.value, "backend → client bytes differ")
        XCTAssertEqual(observed["backendReceived"]?.count, total)
        XCTAssertEqual(observed["backendReceived"]?.value, observed["clientSent"]?.value, "client → backend bytes differ")
        let stats = engine.statistics().frontends["bulk"]!.traffic
        XCTAssertEqual(stats.bytesIn, UInt64(total))
        XCTAssertEqual(stats.bytesOut, UInt64(total))
        print("\(mode): \(megabytes) MiB each way intact in \(Int(Date().timeIntervalSince(started) * 1000)) ms (debug build)")
    }

    func testSixtyFourMiBEachWayThroughSplice() throws { try integrity(mode: .splice) }
    func testSixtyFourMiBEachWayThroughCopy() throws { try integrity(mode: .copy) }
    func testSixtyFourMiBEachWayThroughAuto() throws { try integrity(mode: .auto) }

    /// An engine of one worker in `mode` with one frontend over `backend`, shut down by the caller.
    private func singleWorkerEngine(mode: RelayMode, backend: SocketAddress) throws -> (Engine, SocketAddress) {
        var configuration = EngineConfiguration()
        configuration.relay = mode
        configuration.workers = 1
        let engine = try Engine(configuration: configuration)
        let frontend = try engine.apply(RoutingTable(frontends: [
            Frontend(name: "half", listen: loopbackAnyPort, backends: [Backend(backend)]),
        ])).listening["half"]!
        return (engine, frontend)
    }

    /// The client sends its request and half-closes; the backend answers after seeing EOF.
    func testClientHalfCloseStillGetsTheWholeResponse() throws {
        for mode in RelayMode.allCases {
            let backend = try TestBackend { fd in
                defer { close(fd) }
                guard let request = try? TestSocket.receiveAll(fd), request == Array("question".utf8) else { return }
                _ = try? sendStream(fd, total: 1 << 20, seed: 7)
            }
            defer { backend.stop() }
            let (engine, frontend) = try singleWorkerEngine(mode: mode, backend: backend.address)
            defer { engine.shutdown(drainTimeout: 0) }
            let fd = try TestSocket.connect(frontend)
            defer { close(fd) }
            try TestSocket.sendAll(fd, Array("question".utf8))
            shutdown(fd, CInt(SHUT_WR))
            var expected = ByteStream(seed: 7)
            var bytes = [UInt8](repeating: 0, count: 1 << 20)
            expected.fill(&bytes)
            XCTAssertEqual(try TestSocket.receiveAll(fd, limit: 2 << 20), bytes, "\(mode)")
        }
    }

    /// The backend sends everything and half-closes; the client then still sends, and it arrives.
    func testBackendHalfCloseKeepsTheOtherDirectionOpen() throws {
        for mode in RelayMode.allCases {
            let observed = Observed()
            let backend = try TestBackend { fd in
                defer { close(fd) }
                do {
                    _ = try sendStream(fd, total: 1 << 20, seed: 9)
                    shutdown(fd, CInt(SHUT_WR))
                    observed.record("late", try receiveStream(fd))
                } catch { observed.fail("\(error)") }
            }
            defer { backend.stop() }
            let (engine, frontend) = try singleWorkerEngine(mode: mode, backend: backend.address)
            defer { engine.shutdown(drainTimeout: 0) }
            let fd = try TestSocket.connect(frontend)
            defer { close(fd) }
            let first = try TestSocket.receiveAll(fd, limit: 2 << 20)
            XCTAssertEqual(first.count, 1 << 20, "\(mode)")
            let late = try sendStream(fd, total: 300_000, seed: 11)
            shutdown(fd, CInt(SHUT_WR))
            XCTAssertTrue(eventually { observed["late"] != nil }, "\(mode): the backend never saw the client's EOF")
            XCTAssertEqual(observed["late"]?.value, late.value, "\(mode)")
            XCTAssertEqual(observed["late"]?.count, 300_000, "\(mode)")
            XCTAssertEqual(observed.errors, [], "\(mode)")
        }
    }
}
