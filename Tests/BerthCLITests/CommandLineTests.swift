import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// Acceptance item 1: the command line of `berth` run as a child process: usage errors, --help,
/// environment variables in place of flags, IPv6.
final class CommandLineTests: BerthTestCase {
    /// Every flag of `berth proxy` that has an environment variable.
    static let proxyVariables = [
        "BERTH_LISTEN", "BERTH_BACKENDS", "BERTH_NAME", "BERTH_WORKERS", "BERTH_RETRIES",
        "BERTH_CONNECT_TIMEOUT", "BERTH_CLIENT_TIMEOUT", "BERTH_SERVER_TIMEOUT", "BERTH_DRAIN_TIMEOUT",
        "BERTH_MAXCONN", "BERTH_RELAY", "BERTH_PIPE_SIZE", "BERTH_CPUS",
    ]
    static let whoamiVariables = ["BERTH_LISTEN", "BERTH_ID", "BERTH_THREADS"]

    /// Runs berth and checks it ended with EX_USAGE (64) and exactly one non-empty line on stderr,
    /// nothing on stdout; returns that line.
    @discardableResult
    private func assertUsageError(_ arguments: [String], environment: [String: String] = [:],
                                  file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let (ended, output, error) = try runBerth(arguments, environment: environment)
        let shown = "berth \(arguments.joined(separator: " "))"
        print("\(shown) → \(ended.map(\.description) ?? "still running"), stderr: \(error.debugDescription)")
        XCTAssertEqual(ended, .exited(64), "\(shown): exit status", file: file, line: line)
        XCTAssertTrue(error.hasSuffix("\n"), "\(shown): stderr must end with a newline", file: file, line: line)
        let lines = error.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        XCTAssertEqual(lines.count, 1, "\(shown): exactly one line on stderr, got \(error.debugDescription)", file: file, line: line)
        XCTAssertFalse(lines.first?.trimmingCharacters(in: .whitespaces).isEmpty ?? true, "\(shown): empty message", file: file, line: line)
        XCTAssertEqual(output, "", "\(shown): nothing on stdout", file: file, line: line)
        return error
    }

    func testBadFlagsExitWithUsageCodeAndOneLine() throws {
        let valid = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]
        let unknown = try assertUsageError(["proxy"] + valid + ["--bogus"])
        XCTAssertTrue(unknown.contains("--bogus"), "the message names the unknown flag: \(unknown)")
        try assertUsageError(["proxy", "--bogus"])
        try assertUsageError(["proxy", "--listen", "1.2.3:80", "--backend", "127.0.0.1:9"])
        try assertUsageError(["proxy", "--listen", "[::1:80", "--backend", "127.0.0.1:9"])
        try assertUsageError(["proxy", "--listen", "127.0.0.1:80", "--backend", "127.0.0.1:99999"])
        try assertUsageError(["proxy", "--listen", "127.0.0.1:80", "--backend", "::1:80"])
        let duration = try assertUsageError(["proxy"] + valid + ["--connect-timeout", "5x"])
        XCTAssertTrue(duration.contains("5x"), "the message quotes the bad value: \(duration)")
        try assertUsageError(["proxy"] + valid + ["--drain-timeout", "-1s"])
        let missing = try assertUsageError(["proxy", "--listen", "127.0.0.1:0"])
        XCTAssertTrue(missing.contains("--backend"), "the message names the missing flag: \(missing)")
        try assertUsageError(["proxy"] + valid + ["--workers", "0"])
        try assertUsageError(["proxy"] + valid + ["--relay", "teleport"])
        // Too large for the kernel's int: refused, not a trap when the first pipe is made.
        try assertUsageError(["proxy"] + valid + ["--pipe-size", "99999999999"])
        try assertUsageError(["proxy"] + valid + ["--client-timeout", "30d"])
        try assertUsageError(["proxy"] + valid + ["--retry-on", "empty-response,sometimes"])
        try assertUsageError(["proxy"] + valid + ["--first-byte-timeout", "0"])
        try assertUsageError(["whoami", "--listen", "127.0.0.1:0", "--threads", "0"])
        try assertUsageError(["whoami"])
        try assertUsageError(["frobnicate"])
        // A bad value from the environment is a usage error too.
        try assertUsageError(["proxy"] + valid, environment: ["BERTH_CONNECT_TIMEOUT": "5x"])
    }

    func testHelpExitsZeroAndNamesEveryEnvironmentVariable() throws {
        for (command, variables) in [("proxy", Self.proxyVariables), ("whoami", Self.whoamiVariables)] {
            let (ended, output, error) = try runBerth([command, "--help"])
            XCTAssertEqual(ended, .exited(0), "berth \(command) --help: \(error)")
            XCTAssertTrue(output.contains("USAGE"), "berth \(command) --help prints usage on stdout")
            for variable in variables {
                XCTAssertTrue(output.contains(variable), "berth \(command) --help does not mention \(variable)")
            }
            // Every option shown (except --help/--version) names its variable.
            let options = Set(output.split(whereSeparator: { $0 == " " || $0 == "\n" })
                .filter { $0.hasPrefix("--") && $0.count > 2 && $0 != "--help" && $0 != "--version" }
                .map { $0.trimmingCharacters(in: CharacterSet(charactersIn: ",.)(")) }
                .filter { $0.allSatisfy { $0 == "-" || $0.isLowercase } })
            let mentioned = output.components(separatedBy: "(env:").count - 1
            print("berth \(command) --help: \(options.count) options \(options.sorted()), \(mentioned) env mentions")
            XCTAssertGreaterThanOrEqual(mentioned, options.count, "an option of berth \(command) has no env variable")
        }
    }

    func testEnvironmentVariablesReplaceFlags() throws {
        let first = try startWhoami(id: "env-a")
        let second = try startWhoami(id: "env-b")
        let proxy = try startProxy(backends: [], environment: [
            "BERTH_BACKENDS": "\(first.address), \(second.address)", "BERTH_WORKERS": "1", "BERTH_NAME": "from-env",
        ])
        var answers: [String] = []
        for _ in 0..<4 {
            let response = HTTPExchange.get(proxy.port)
            XCTAssertEqual(response?.status, 200)
            answers.append(response?.text.trimmingCharacters(in: CharacterSet.whitespacesAndNewlines) ?? "none")
        }
        print("answers through BERTH_BACKENDS: \(answers)")
        XCTAssertEqual(Set(answers), ["I'm env-a", "I'm env-b"], "both backends of the comma list serve")
        XCTAssertTrue(proxy.process.standardError.contains("from-env"), "BERTH_NAME is used: \(proxy.process.standardError)")

        // BERTH_LISTEN in place of --listen (proxy and whoami).
        let port = try TestSocket.freePort()
        let whoami = try launch(BerthBinary.path, ["whoami"], environment: ["BERTH_LISTEN": "127.0.0.1:\(port)", "BERTH_ID": "env-c"])
        XCTAssertTrue(whoami.waitForStandardError(containing: "listening on", timeout: 10), whoami.standardError)
        let proxyPort = try TestSocket.freePort()
        let viaEnvironment = try launch(BerthBinary.path, ["proxy"], environment: [
            "BERTH_LISTEN": "127.0.0.1:\(proxyPort)", "BERTH_BACKENDS": "127.0.0.1:\(port)",
        ])
        XCTAssertTrue(viaEnvironment.waitForStandardError(containing: "listening on", timeout: 10), viaEnvironment.standardError)
        XCTAssertEqual(HTTPExchange.get(proxyPort)?.text, "I'm env-c\n")

        // A flag given on the command line wins over its variable.
        let flagWins = try startProxy(backends: [first.address], environment: ["BERTH_BACKENDS": second.address])
        XCTAssertEqual(HTTPExchange.get(flagWins.port)?.text, "I'm env-a\n")
    }

    /// The default worker count is the CPUs the process may run on: under `taskset -c 0` on a
    /// machine with more, one worker (it used to start one per online CPU).
    func testDefaultWorkersFollowTheAffinityMask() throws {
        let taskset = "/usr/bin/taskset"
        guard access(taskset, X_OK) == 0 else { throw XCTSkip("taskset (util-linux) is not installed") }
        guard sysconf(CInt(_SC_NPROCESSORS_ONLN)) > 1 else { throw XCTSkip("one online CPU: nothing to restrict") }
        let whoami = try startWhoami(id: "pinned")
        let proxy = try startProxy(backends: [whoami.address], launcher: [taskset, "-c", "0"])
        XCTAssertEqual(HTTPExchange.get(proxy.port)?.text, "I'm pinned\n")
        XCTAssertTrue(proxy.process.standardError.contains(" 1 worker(s)"), proxy.process.standardError)
    }

    /// --connect-timeout and --retries take effect: a backend that never completes the handshake
    /// (its accept queue is full, so SYNs are dropped) is given up after the timeout and the next
    /// backend serves the connection.
    func testConnectTimeoutSkipsAnUnresponsiveBackend() throws {
        let live = try startWhoami(id: "live")
        let (blackHole, blackHolePort) = try TestSocket.listen(backlog: 0)
        sockets.add(blackHole)
        for _ in 0..<3 {  // fill the accept queue; the third SYN may already be dropped
            let fd = TestSocket.makeSocket("127.0.0.1")
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            _ = TestSocket.withAddress("127.0.0.1", blackHolePort) { Glibc.connect(fd, $0, $1) }
            sockets.add(fd)
        }
        sleep(seconds: 0.1)
        let proxy = try startProxy(backends: ["127.0.0.1:\(blackHolePort)", live.address],
                                   options: ["--workers", "1", "--connect-timeout", "300ms", "--retries", "2"])
        var latencies: [Double] = []
        for _ in 0..<6 {
            let started = now()
            let response = HTTPExchange.get(proxy.port, timeout: 5)
            latencies.append(now() - started)
            XCTAssertEqual(response?.text, "I'm live\n")
        }
        print("latencies with a black-hole backend and --connect-timeout 300ms: \(latencies.map { String(format: "%.0f ms", $0 * 1000) })")
        XCTAssertGreaterThanOrEqual(latencies.max() ?? 0, 0.28, "some connections tried the black hole first")
        XCTAssertLessThan(latencies.max() ?? 99, 1.5, "the black hole is given up after --connect-timeout")
    }

    func testIPv6ListenAndBackend() throws {
        guard TestSocket.ipv6LoopbackAvailable() else { throw XCTSkip("::1 is not available on this machine") }
        let backend = try startWhoami(id: "six", host: "::1")
        let proxy = try startProxy(backends: [backend.address], options: ["--workers", "1"], host: "::1")
        print("proxy \(proxy.address) → backend \(backend.address)")
        for _ in 0..<3 {
            let response = HTTPExchange.get(proxy.port, host: "::1")
            XCTAssertEqual(response?.status, 200)
            XCTAssertEqual(response?.text, "I'm six\n")
        }
    }
}
