import BerthSystem
import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `--log-connections`: one line per closed connection with HAProxy's tcplog fields, through a
/// real `berth proxy`, from real `berth whoami` backends and peers that refuse, never answer the
/// SYN, or wait.
final class ConnectionLogTests: BerthTestCase {
    /// The JSON records the proxy wrote to stderr so far.
    private func records(_ proxy: ListeningChild) -> [[String: Any]] {
        proxy.process.standardError.split(separator: "\n").compactMap { line in
            guard line.hasPrefix("{") else { return nil }
            return (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
        }
    }

    private func waitForRecords(_ proxy: ListeningChild, count: Int) -> [[String: Any]] {
        var found: [[String: Any]] = []
        _ = waitUntil(timeout: 10, interval: 0.02) {
            found = records(proxy)
            return found.count >= count
        }
        return found
    }

    func testJSONRecordsOfNormalRefusedAndTimedOutConnections() throws {
        let backend = try startWhoami(id: "logged")
        let refused = try TestSocket.freePort("127.0.0.1")
        let silent = try SynDroppingListener()
        defer { silent.close() }
        let proxy = try startProxy(backends: [backend.address, "127.0.0.1:\(refused)", silent.address.description], options: [
            "--log-connections", "--log-format", "json", "--retries", "0", "--connect-timeout", "300ms", "--client-timeout", "400ms",
        ])
        // Three sequential requests: the rotation tries whoami, the refused port, the silent one.
        for _ in 0..<3 { _ = try? HTTPProbe.get(port: Int(proxy.port), timeout: 3) }
        // A client that connects and says nothing: the rotation gives it whoami; it times out.
        let idle = try connect(proxy.port)
        let logged = waitForRecords(proxy, count: 4)
        print("connection log: \(logged)")
        XCTAssertEqual(logged.count, 4, proxy.process.standardError)
        guard logged.count == 4 else { return }
        let byState = Dictionary(grouping: logged) { $0["termination_state"] as? String ?? "?" }
        XCTAssertEqual(Set(byState.keys), ["--", "SC", "sC", "cD"], "\(logged)")
        let normal = byState["--"]?.first ?? [:]
        XCTAssertEqual(normal["client_ip"] as? String, "127.0.0.1")
        XCTAssertGreaterThan(normal["client_port"] as? Int ?? 0, 0)
        XCTAssertEqual(normal["frontend"] as? String, "proxy")
        XCTAssertEqual(normal["server"] as? String, backend.address)
        XCTAssertGreaterThan(normal["bytes_read"] as? Int ?? 0, 50, "the answer's bytes")
        XCTAssertGreaterThan(normal["bytes_uploaded"] as? Int ?? 0, 20, "the request's bytes")
        XCTAssertGreaterThanOrEqual(normal["Tc"] as? Int ?? -1, 0)
        XCTAssertGreaterThanOrEqual(normal["Tt"] as? Int ?? -1, normal["Tc"] as? Int ?? 0)
        XCTAssertNotNil((normal["accept_date"] as? String)?.range(of: #"^\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\.\d{3}$"#, options: .regularExpression))
        XCTAssertEqual(byState["SC"]?.first?["server"] as? String, "127.0.0.1:\(refused)")
        XCTAssertEqual(byState["SC"]?.first?["Tc"] as? Int, -1, "never connected")
        let timedOut = byState["sC"]?.first ?? [:]
        XCTAssertEqual(timedOut["server"] as? String, silent.address.description)
        XCTAssertGreaterThanOrEqual(timedOut["Tt"] as? Int ?? 0, 250, "ended by the 300 ms connect timeout")
        let idleRecord = byState["cD"]?.first ?? [:]
        XCTAssertEqual(idleRecord["bytes_uploaded"] as? Int, 0)
        XCTAssertGreaterThanOrEqual(idleRecord["Tt"] as? Int ?? 0, 350, "ended by the 400 ms client timeout")
        close(idle)
    }

    func testPlainLinesFollowHAProxysTCPLogLayout() throws {
        let backend = try startWhoami(id: "plain")
        let proxy = try startProxy(backends: [backend.address], options: ["--log-connections", "--name", "web"])
        for _ in 0..<2 { XCTAssertEqual(try HTTPProbe.get(port: Int(proxy.port)), "I'm plain\n") }
        let pattern = #"^127\.0\.0\.1:\d+ \[\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d\.\d{3}\] web web/"#
            + NSRegularExpression.escapedPattern(for: backend.address) + #" 0/\d+/\d+ \d+ -- \d+/0/0/0/0 0/0$"#
        var lines: [String] = []
        _ = waitUntil(timeout: 10, interval: 0.02) {
            lines = proxy.process.standardError.split(separator: "\n").map(String.init).filter { $0.range(of: pattern, options: .regularExpression) != nil }
            return lines.count >= 2
        }
        XCTAssertEqual(lines.count, 2, proxy.process.standardError)
        print("plain: \(lines)")
    }

    /// A writer that falls behind does not block the workers: a full ring drops records, and the
    /// drops are counted on /metrics and /stats.json.
    func testAFullRingDropsAndCountsInsteadOfBlocking() throws {
        let backend = try startWhoami(id: "drops")
        let stats = try TestSocket.freePort("127.0.0.1")
        let proxy = try startProxy(backends: [backend.address], options: [
            "--log-connections", "--log-ring", "2", "--log-flush-interval", "5000", "--stats", "127.0.0.1:\(stats)", "--workers", "1",
        ])
        // The writer drains at start, then sleeps 5 s: 20 connections meet one worker's ring of 2.
        sleep(seconds: 0.2)
        for _ in 0..<20 { XCTAssertEqual(try HTTPProbe.get(port: Int(proxy.port)), "I'm drops\n") }
        let metrics = try HTTPProbe.get(port: Int(stats), path: "/metrics")
        let dropped = metrics.split(separator: "\n").first { $0.hasPrefix("berth_connection_log_dropped_total ") }
            .flatMap { Double($0.split(separator: " ").last ?? "") } ?? -1
        print("drops: \(dropped) of 20")
        XCTAssertGreaterThanOrEqual(dropped, 17, metrics)
        let page = try HTTPProbe.get(port: Int(stats), path: "/stats.json")
        XCTAssertNotNil(page.range(of: #""connectionLogDropped"\s*:\s*"# + "\(Int(dropped))", options: .regularExpression), page)
        // Every request was answered meanwhile; the records kept are written at the next drain.
        var written = 0.0
        _ = waitUntil(timeout: 10, interval: 0.1) {
            let text = (try? HTTPProbe.get(port: Int(stats), path: "/metrics")) ?? ""
            written = text.split(separator: "\n").first { $0.hasPrefix("berth_connection_log_records_total ") }
                .flatMap { Double($0.split(separator: " ").last ?? "") } ?? 0
            return written >= 1
        }
        XCTAssertEqual(written + dropped, 20, "every closed connection is written or counted as dropped")
    }
}
