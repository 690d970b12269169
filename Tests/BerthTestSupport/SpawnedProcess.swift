// Child processes for fixtures (dockerd, docker, berth): started with posix_spawn, output to
// temporary files, waited for with deadlines, stopped by PID only.
import Foundation
import Glibc
import Synchronization

/// Seconds on the monotonic clock.
public func monotonicSeconds() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
}

/// Polls `condition` every 10 ms until it holds or `timeout` seconds pass; the seconds it took,
/// or nil on timeout.
@discardableResult
public func waitUntil(timeout: Double, interval: Double = 0.01, _ condition: () throws -> Bool) rethrows -> Double? {
    let start = monotonicSeconds()
    while true {
        if try condition() { return monotonicSeconds() - start }
        if monotonicSeconds() - start > timeout { return nil }
        usleep(useconds_t(interval * 1e6))
    }
}

/// A child: stdin from /dev/null, stdout/stderr into temporary files, every other descriptor of
/// the test closed in the child, signal mask and dispositions reset. Only this object reaps it.
public final class SpawnedProcess: Sendable {
    public let pid: pid_t
    public let command: String
    private let outputPath: String
    private let errorPath: String
    private let status = Mutex<CInt?>(nil)
    private static let sequence = Atomic<Int>(0)

    public init(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        let serial = Self.sequence.add(1, ordering: .relaxed).newValue
        let base = "\(NSTemporaryDirectory())berth-spawn-\(getpid())-\(serial)"
        outputPath = base + ".out"
        errorPath = base + ".err"
        command = ([executable] + arguments).joined(separator: " ")

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
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
        let result = posix_spawnp(&child, executable, &actions, &attributes, argv, envp)
        guard result == 0 else { throw FixtureFailure("posix_spawn \(executable): \(String(cString: strerror(result)))") }
        pid = child
    }

    /// A child never outlives its owner: killed (by PID) and reaped, output files removed.
    deinit {
        if poll() == nil {
            kill(pid, SIGKILL)
            _ = waitForExit(timeout: 5)
        }
        unlink(outputPath)
        unlink(errorPath)
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, CInt) -> CInt
    private static let addCloseFrom: AddCloseFrom? = {
        guard let symbol = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(symbol, to: AddCloseFrom.self)
    }()

    public var standardOutput: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
    public var standardError: String { (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? "" }

    /// The wait status once the child has ended (never blocks).
    @discardableResult
    public func poll() -> CInt? {
        status.withLock { status in
            if let status { return status }
            var raw: CInt = 0
            guard waitpid(pid, &raw, WNOHANG) == pid else { return nil }
            status = raw
            return raw
        }
    }

    public var isRunning: Bool { poll() == nil }

    /// The exit code, or 128 + signal, once ended.
    public var exitCode: CInt? {
        guard let raw = poll() else { return nil }
        return raw & 0x7f == 0 ? (raw >> 8) & 0xff : 128 + (raw & 0x7f)
    }

    public func signal(_ number: CInt) {
        if isRunning { kill(pid, number) }
    }

    public func waitForExit(timeout: Double) -> Bool {
        waitUntil(timeout: timeout, interval: 0.005) { !isRunning } != nil
    }

    /// SIGTERM, up to `grace` seconds, then SIGKILL; reaps; removes the output files.
    public func stop(grace: Double = 5) {
        signal(SIGTERM)
        if !waitForExit(timeout: grace) {
            signal(SIGKILL)
            _ = waitForExit(timeout: 5)
        }
        unlink(outputPath)
        unlink(errorPath)
    }

    /// Runs a command to its end (at most `timeout` seconds, then SIGKILL): exit code and output.
    public static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
                           timeout: Double = 60) throws -> (code: CInt, output: String, error: String) {
        let process = try SpawnedProcess(executable, arguments, environment: environment)
        if !process.waitForExit(timeout: timeout) {
            process.signal(SIGKILL)
            _ = process.waitForExit(timeout: 5)
        }
        let result = (process.exitCode ?? -1, process.standardOutput, process.standardError)
        unlink(process.outputPath)
        unlink(process.errorPath)
        return result
    }
}
