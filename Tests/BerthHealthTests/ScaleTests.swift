import BerthEngine
import BerthSystem
import BerthHealth
import Foundation
import Glibc
import Synchronization
import XCTest

/// The checker's own cost with many backends.
final class ScaleTests: XCTestCase {
    /// CPU ticks (user + system) of this process's thread named `name`.
    private func threadTicks(named name: String) -> Int? {
        guard let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task") else { return nil }
        for task in tasks {
            guard let comm = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
                  comm.trimmingCharacters(in: .whitespacesAndNewlines) == name,
                  let stat = try? String(contentsOfFile: "/proc/self/task/\(task)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // After the name: state is field 3, utime 14, stime 15 (1-based) → indices 11, 12 here.
            return Int(fields[11])! + Int(fields[12])!
        }
        return nil
    }

    func testAThousandBackendsCheckedEverySecond() throws {
        // 1,000 listeners on 127.0.0.1; one thread accepts and closes whatever arrives.
        var listeners: [CInt] = []
        defer { for fd in listeners { close(fd) } }
        var addresses: [SocketAddress] = []
        for _ in 0..<1000 {
            var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
            addresses.append(try Sockets.localAddress(socket.raw))
            listeners.append(socket.release())
        }
        let stop = Atomic<Bool>(false)
        let fds = listeners
        let acceptor = Thread {
            var polls = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            while true {
                if stop.load(ordering: .relaxed) { return }
                guard poll(&polls, nfds_t(polls.count), 50) > 0 else { continue }
                for index in polls.indices where polls[index].revents != 0 {
                    while case let fd = accept(polls[index].fd, nil, nil), fd >= 0 { close(fd) }
                }
            }
        }
        acceptor.start()
        defer {
            stop.store(true, ordering: .relaxed)
            while !acceptor.isFinished { usleep(10_000) }
        }

        let checker = try HealthChecker()
        defer { checker.stop() }
        let settings = CheckSettings(kind: .tcp, interval: 1000, timeout: 500, rise: 1, fall: 1)
        checker.update(addresses.enumerated().map {
            CheckTarget(key: BackendKey(frontend: "f", backend: "b\($0.offset)"), address: $0.element,
                        settings: settings, initialState: .up)
        })
        XCTAssertNotNil(waitFor(timeout: 5) { checker.health().values.allSatisfy { $0.checksDone >= 1 } },
                        "every backend checked within its first interval")
        let checksBefore = checker.totalChecks
        let ticksBefore = threadTicks(named: "berth-checks") ?? 0
        let seconds = 5.0
        usleep(UInt32(seconds * 1_000_000))
        let checks = checker.totalChecks - checksBefore
        let ticks = (threadTicks(named: "berth-checks") ?? 0) - ticksBefore
        let hertz = Double(sysconf(Int32(_SC_CLK_TCK)))
        let cpu = Double(ticks) / hertz / seconds * 100
        let health = checker.health()
        let down = health.values.filter { $0.status == .down }.count
        print("1,000 backends, TCP check every 1 s: \(Int(Double(checks) / seconds)) checks/s, checker thread \(String(format: "%.1f", cpu))% of one core (\(String(format: "%.0f", cpu * 10 / (Double(checks) / seconds) * 1000)) us per check), \(down) down")
        XCTAssertGreaterThan(Double(checks) / seconds, 800)
        XCTAssertLessThan(Double(checks) / seconds, 1200)
        XCTAssertEqual(down, 0)
        XCTAssertLessThan(cpu, 50)
    }
}
