import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `berth dev` (what `scripts/demo` runs) as a child process: its own etcd, three whoami
/// backends, the service rotating over them, the stats page, and nothing left after Ctrl-C.
final class DevCommandTests: BerthTestCase {
    func testDevRunsEverythingAndLeavesNothingBehind() throws {
        guard access(EtcdFixture.etcdPath, X_OK) == 0 else { throw XCTSkip("\(EtcdFixture.etcdPath) is not installed") }
        let port = try freeLoopbackPort(), statsPort = try freeLoopbackPort()
        let dev = try launch(BerthBinary.path, ["dev", "--port", "\(port)", "--stats", "127.0.0.1:\(statsPort)"])
        let deadline = Date().addingTimeInterval(30)
        while !dev.standardOutput.contains("ready") && dev.isRunning && Date() < deadline { usleep(50_000) }
        let banner = dev.standardOutput
        XCTAssertTrue(banner.contains("berth dev: ready"), "stdout: \(banner)\nstderr: \(dev.standardError)")
        guard banner.contains("ready") else { return }

        // Its etcd: a child of berth dev, with its data in the directory the banner names.
        let directory = try XCTUnwrap(banner.range(of: "(data in ").map { banner[$0.upperBound...].prefix { $0 != ")" } }).description
        XCTAssertTrue(directory.hasPrefix("/tmp/berth-dev."), directory)
        XCTAssertTrue(FileManager.default.fileExists(atPath: directory + "/data"), directory)
        let etcd = try XCTUnwrap(Self.children(of: dev.pid).first { $0.name == "etcd" }, "no etcd child of berth dev")

        // Six requests: the three backends, twice in the same order.
        let answers = try (0..<6).map { _ in
            try HTTPProbe.get(port: port, timeout: 3).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        XCTAssertEqual(Set(answers.prefix(3)), ["I'm whoami-1", "I'm whoami-2", "I'm whoami-3"], "\(answers)")
        XCTAssertEqual(Array(answers.prefix(3)), Array(answers.suffix(3)), "not a rotation: \(answers)")
        let csv = try HTTPProbe.get(port: statsPort, path: "/;csv", timeout: 3)
        XCTAssertEqual(csv.split(separator: "\n").filter { $0.hasPrefix("whoami,127.0.0.1:") }.count, 3, csv)

        // Ctrl-C: exit 0, etcd gone, its data gone.
        dev.signal(SIGINT)
        XCTAssertEqual(dev.waitForExit(timeout: 20), .exited(0), dev.standardError)
        XCTAssertTrue(dev.standardError.contains("stopped everything"), dev.standardError)
        XCTAssertFalse(FileManager.default.fileExists(atPath: directory), "\(directory) was left behind")
        XCTAssertNotEqual(kill(etcd.pid, 0), 0, "etcd (pid \(etcd.pid)) outlived berth dev")
        XCTAssertThrowsError(try HTTPProbe.get(port: port, timeout: 1), "the service still answers")
    }

    /// The processes whose parent is `pid` (their pid and `comm`), from /proc.
    static func children(of pid: pid_t) -> [(pid: pid_t, name: String)] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> (pid: pid_t, name: String)? in
            guard let child = pid_t(entry), let stat = try? String(contentsOfFile: "/proc/\(entry)/stat", encoding: .utf8),
                  let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")") else { return nil }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 1, pid_t(fields[1]) == pid else { return nil }
            return (child, String(stat[stat.index(after: open)..<close]))
        }
    }
}
