// Shared fixtures of the BerthCLITests target: the `berth` binary run as a child process, /proc
// probes, blocking test sockets, an in-test backend, and a base test case that cleans up after
// itself. Everything here is bounded in time: no wait, read or loop runs without a deadline.
import BerthSystem
import BerthTestSupport
import CBerthShims
import Foundation
import Glibc
import Synchronization
import XCTest

/// A fixture failure with a message fit for the test log.
struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A failed socket call's errno.
struct SocketFailure: Error, Equatable {
    let errno: CInt
}

/// Seconds on the monotonic clock.
func now() -> Double { Double(MonotonicClock.nanoseconds()) / 1e9 }

func sleep(seconds: Double) { usleep(useconds_t(max(0, seconds) * 1e6)) }


// MARK: - Child processes

/// How a child ended.
enum Termination: Equatable, CustomStringConvertible {
    case exited(CInt)
    case signaled(CInt)

    var description: String {
        switch self {
        case .exited(let code): "exit code \(code)"
        case .signaled(let signal): "killed by signal \(signal)"
        }
    }
}

/// A child started with posix_spawn: stdin from /dev/null, stdout and stderr into temporary files
/// (readable at any time, never blocking the child), every other fd of the test closed in the
/// child, signal mask and dispositions reset. Only this object waits for its pid.
final class ChildProcess: Sendable {
    let pid: pid_t
    let command: String
    private let outputPath: String
    private let errorPath: String
    private let termination = Mutex<Termination?>(nil)
    private static let sequence = Atomic<Int>(0)

    /// Starts `executable` with `arguments`; the environment is the test's minus every `BERTH_*`
    /// variable, plus `environment`.
    init(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        let serial = Self.sequence.add(1, ordering: .relaxed).newValue
        let base = "\(NSTemporaryDirectory())berth-cli-\(getpid())-\(serial)"
        outputPath = base + ".out"
        errorPath = base + ".err"
        command = ([executable] + arguments).joined(separator: " ")

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        // The test holds thousands of sockets; none may leak into berth (its fd count is measured).
        if let closeFrom = Self.addCloseFrom { _ = closeFrom(&actions, 3) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGCHLD] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var mask = sigset_t()
        sigemptyset(&mask)
        posix_spawnattr_setsigmask(&attributes, &mask)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        var variables = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("BERTH_") }
        for (key, value) in environment { variables[key] = value }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = variables.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for pointer in argv + envp { free(pointer) } }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
        guard result == 0 else {
            throw FixtureError("posix_spawn \(executable): \(String(cString: strerror(result)))")
        }
        pid = child
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, CInt) -> CInt
    /// glibc ≥ 2.34's `posix_spawn_file_actions_addclosefrom_np` (not exported by the Glibc module).
    private static let addCloseFrom: AddCloseFrom? = {
        guard let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(symbol, to: AddCloseFrom.self)
    }()

    var standardError: String { (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? "" }
    var standardOutput: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }

    func signal(_ signal: CInt) {
        if poll() == nil { kill(pid, signal) }
    }

    /// Reaps the child if it has ended (never blocks).
    @discardableResult
    func poll() -> Termination? {
        termination.withLock { termination in
            if let termination { return termination }
            var status: CInt = 0
            guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
            termination = status & 0x7f == 0 ? .exited((status >> 8) & 0xff) : .signaled(status & 0x7f)
            return termination
        }
    }

    var isRunning: Bool { poll() == nil }

    /// Waits up to `timeout` seconds for the child to end.
    func waitForExit(timeout: Double) -> Termination? {
        let deadline = now() + timeout
        while now() < deadline {
            if let ended = poll() { return ended }
            sleep(seconds: 0.005)
        }
        return poll()
    }

    /// Waits until stderr contains `text`; false if the child ended first or time ran out.
    func waitForStandardError(containing text: String, timeout: Double) -> Bool {
        let deadline = now() + timeout
        while now() < deadline {
            if standardError.contains(text) { return true }
            if poll() != nil { return standardError.contains(text) }
            sleep(seconds: 0.01)
        }
        return standardError.contains(text)
    }

    /// Kills the child if still running, reaps it and removes its output files.
    func terminateAndReap() {
        if poll() == nil {
            kill(pid, SIGKILL)
            _ = waitForExit(timeout: 5)
        }
        unlink(outputPath)
        unlink(errorPath)
    }
}

// MARK: - /proc probes

/// Resource figures of a process, read from /proc.
enum ProcessProbe {
    /// A field of /proc/PID/status in KiB (VmRSS, VmHWM, ...).
    static func statusKiB(_ pid: pid_t, _ field: String) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return -1 }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            return Int(line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "") ?? -1
        }
        return -1
    }

    static func residentKiB(_ pid: pid_t) -> Int {
        let value = statusKiB(pid, "VmRSS")
        XCTAssertGreaterThan(value, 0, "VmRSS of \(pid) could not be read")
        return value
    }

    /// utime + stime of all threads, in clock ticks.
    static func cpuTicks(_ pid: pid_t) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return -1 }
        // Fields after "(comm)" start at field 3 (state); utime is field 14, stime field 15.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Int(fields[11]), let system = Int(fields[12]) else { return -1 }
        return user + system
    }

    /// Share of one core the process used over the next `seconds`.
    static func cpuShare(_ pid: pid_t, over seconds: Double) -> Double {
        let start = now()
        let before = cpuTicks(pid)
        sleep(seconds: seconds)
        let after = cpuTicks(pid)
        XCTAssertTrue(before >= 0 && after >= 0, "CPU ticks of \(pid) could not be read")
        let ticks = after - before
        return Double(ticks) / Double(sysconf(CInt(_SC_CLK_TCK))) / (now() - start)
    }

    /// Open descriptors of a process, by kind.
    struct Descriptors: Equatable, CustomStringConvertible {
        var sockets = 0
        var pipes = 0
        var other = 0
        var total: Int { sockets + pipes + other }
        var description: String { "\(total) fds (\(sockets) sockets, \(pipes) pipe ends, \(other) other)" }
    }

    static func descriptors(_ pid: pid_t) -> Descriptors {
        var census = Descriptors()
        let directory = "/proc/\(pid)/fd"
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return census }
        var buffer = [CChar](repeating: 0, count: 256)
        for entry in entries {
            let length = readlink("\(directory)/\(entry)", &buffer, buffer.count - 1)
            guard length > 0 else { continue }  // closed meanwhile
            let target = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if target.hasPrefix("socket:") { census.sockets += 1 }
            else if target.hasPrefix("pipe:") { census.pipes += 1 }
            else { census.other += 1 }
        }
        return census
    }
}

// MARK: - Base test case

/// Client sockets a test opened and has not closed yet; the rest are closed at teardown.
final class SocketJar: Sendable {
    private let open = Mutex<Set<CInt>>([])

    func add(_ fd: CInt) { open.withLock { _ = $0.insert(fd) } }

    func close(_ fd: CInt) {
        if open.withLock({ $0.remove(fd) }) != nil { Glibc.close(fd) }
    }

    func closeAll() {
        for fd in open.withLock({ let all = $0; $0.removeAll(); return all }) { Glibc.close(fd) }
    }
}

/// A berth child that listens, and where.
struct ListeningChild {
    let process: ChildProcess
    let host: String
    let port: UInt16
    var address: String { Self.format(host, port) }
    var pid: pid_t { process.pid }

    /// `HOST:PORT`, with brackets around an IPv6 host.
    static func format(_ host: String, _ port: UInt16) -> String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }
}

/// Base of every test here: finds the binary, raises the fd limit, ignores SIGPIPE, and stops
/// every child, backend and socket the test started, even when it fails.
class BerthTestCase: XCTestCase {
    let sockets = SocketJar()
    private var descriptorsAtStart = 0
    private var openAtStart: [String: String] = [:]

    /// fd number → what it points to, from /proc/self/fd.
    static func openDescriptors() -> [String: String] { openDescriptorMap() }

    /// What the process opens once for its lifetime on first use (Foundation's Process and
    /// /dev/null handle, a first child reaped, temporary files) is opened here, before any
    /// test counts descriptors, whichever test class runs first.
    override class func setUp() {
        super.setUp()
        _ = try? runProgram("/bin/true", [], timeout: 5)
        if let child = try? ChildProcess("/bin/true", []) {
            _ = child.waitForExit(timeout: 5)
            child.terminateAndReap()  // removes its output files
        }
        // libdispatch opens a timerfd per clock on the first timer of that clock (XCTest,
        // Foundation and Swift concurrency arm some at unpredictable moments, and a test's
        // leak check then saw one appear): arm each clock's once now.
        let fired = DispatchSemaphore(value: 0)
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.001) { fired.signal() }
        DispatchQueue.global().asyncAfter(wallDeadline: .now() + 0.001) { fired.signal() }
        Task {
            try? await Task.sleep(for: .milliseconds(1))
            try? await Task.sleep(until: .now + .milliseconds(1), clock: .suspending)
            fired.signal()
        }
        for _ in 0..<3 { _ = fired.wait(timeout: .now() + 2) }
    }

    override func setUpWithError() throws {
        try super.setUpWithError()
        descriptorsAtStart = ProcessProbe.descriptors(getpid()).total
        openAtStart = Self.openDescriptors()
        signal(SIGPIPE, SIG_IGN)
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        limit.rlim_cur = limit.rlim_max
        setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
        guard access(BerthBinary.path, X_OK) == 0 else {
            throw FixtureError("the berth binary is missing at \(BerthBinary.path): run `swift build` first (scripts/test does) or set BERTH_BINARY")
        }
        addTeardownBlock { [sockets] in sockets.closeAll() }
    }

    /// The test process must not leak fds either (children, backends, sockets all cleaned up).
    override func tearDown() {
        var current = ProcessProbe.descriptors(getpid()).total
        for _ in 0..<100 where current > descriptorsAtStart {
            sleep(seconds: 0.02)
            current = ProcessProbe.descriptors(getpid()).total
        }
        let opened = Self.openDescriptors().filter { openAtStart[$0.key] != $0.value }
        XCTAssertLessThanOrEqual(current, descriptorsAtStart, "the test process leaked descriptors: \(opened.sorted { $0.key < $1.key })")
        super.tearDown()
    }

    /// Starts a child that is killed at teardown if still running (its stderr is printed then
    /// if the test failed).
    func launch(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> ChildProcess {
        let process = try ChildProcess(executable, arguments, environment: environment)
        addTeardownBlock { [weak self] in
            if (self?.testRun?.failureCount ?? 0) > 0 {
                print("--- stderr of \(process.command) (\(process.poll().map(\.description) ?? "running")):\n\(process.standardError)")
            }
            process.terminateAndReap()
        }
        return process
    }

    /// Runs `berth ARGS` to its end: how it ended, stdout, stderr.
    func runBerth(_ arguments: [String], environment: [String: String] = [:], timeout: Double = 10) throws -> (Termination?, String, String) {
        let process = try launch(BerthBinary.path, arguments, environment: environment)
        let ended = process.waitForExit(timeout: timeout)
        return (ended, process.standardOutput, process.standardError)
    }

    /// Starts a child that listens on a port picked here (free a moment earlier); picks another
    /// port if the child reports the address in use. Waits for its "listening on" line.
    private func startListening(
        _ host: String, _ command: (UInt16) -> (executable: String, arguments: [String], environment: [String: String])
    ) throws -> ListeningChild {
        for attempt in 1...5 {
            let port = try TestSocket.freePort(host)
            let (executable, arguments, environment) = command(port)
            let process = try launch(executable, arguments, environment: environment)
            if process.waitForStandardError(containing: "listening on", timeout: 10) && process.isRunning {
                return ListeningChild(process: process, host: host, port: port)
            }
            let error = process.standardError
            process.terminateAndReap()
            if error.contains("in use") && attempt < 5 { continue }
            throw FixtureError("\(process.command) did not start (\(process.poll().map(\.description) ?? "no exit")): \(error)")
        }
        throw FixtureError("no free port found")
    }

    func startWhoami(id: String, threads: Int = 1, host: String = "127.0.0.1", options: [String] = []) throws -> ListeningChild {
        try startListening(host) { port in
            (BerthBinary.path, ["whoami", "--listen", ListeningChild.format(host, port), "--id", id, "--threads", "\(threads)"] + options, [:])
        }
    }

    /// `berth proxy --listen HOST:PORT --backend B,.. OPTIONS`; `launcher` goes before the binary
    /// (e.g. `prlimit --nofile=64:64`, which execs berth, so the pid is berth's).
    func startProxy(backends: [String], options: [String] = [], host: String = "127.0.0.1",
                    environment: [String: String] = [:], launcher: [String] = []) throws -> ListeningChild {
        try startListening(host) { port in
            var arguments = ["proxy", "--listen", ListeningChild.format(host, port)] + options
            if !backends.isEmpty { arguments += ["--backend", backends.joined(separator: ",")] }
            if let executable = launcher.first {
                return (executable, Array(launcher.dropFirst()) + [BerthBinary.path] + arguments, environment)
            }
            return (BerthBinary.path, arguments, environment)
        }
    }

    func startBackend(_ mode: TestBackend.Mode) throws -> TestBackend {
        let backend = try TestBackend(mode)
        addTeardownBlock { backend.stop() }
        return backend
    }

    /// A connected client socket, closed at teardown unless closed before.
    func connect(_ port: UInt16, host: String = "127.0.0.1", timeout: Double = 5) throws -> CInt {
        switch TestSocket.connect(port, host: host, timeout: timeout) {
        case .success(let fd):
            sockets.add(fd)
            return fd
        case .failure(let failure):
            throw FixtureError("connect to \(host):\(port): \(String(cString: strerror(failure.errno)))")
        }
    }

    /// Runs `body(i)` for i in 0..<count, each on its own thread, and waits for all. Bodies must
    /// bound themselves (socket timeouts); `timeout` only decides when the test says so.
    func concurrently(_ count: Int, timeout: Double, _ body: @escaping @Sendable (Int) -> Void) {
        let finished = Atomic<Int>(0)
        let threads = (0..<count).map { index in
            OSThread(name: "test-client") {
                body(index)
                finished.add(1, ordering: .relaxed)
            }
        }
        let deadline = now() + timeout
        while finished.load(ordering: .relaxed) < count && now() < deadline { sleep(seconds: 0.005) }
        XCTAssertEqual(finished.load(ordering: .relaxed), count, "\(count - finished.load(ordering: .relaxed)) client thread(s) still running after \(timeout) s")
        for thread in threads { thread.join() }
    }
}
