import BerthSystem
import CBerthShims
import Glibc
import Synchronization

/// Why the benchmark could not go on (or a setup could not run).
enum BenchError: Error, CustomStringConvertible {
    case system(SystemError)
    /// A child process did not start, did not announce itself, or died.
    case child(String)
    /// A phase of load failed (too many errors, no target reachable).
    case load(String)

    var description: String {
        switch self {
        case .system(let error): "\(error)"
        case .child(let message): message
        case .load(let message): message
        }
    }
}

/// What the bench must undo if it is interrupted: children it has started and not yet reaped,
/// temporary directories it has not yet removed. Any thread; the signal thread empties it.
final class CleanupRegistry: Sendable {
    private struct Entries {
        var children: Set<pid_t> = []
        var directories: Set<String> = []
    }

    private let entries = Mutex(Entries())

    func add(child pid: pid_t) { entries.withLock { _ = $0.children.insert(pid) } }
    func remove(child pid: pid_t) { entries.withLock { _ = $0.children.remove(pid) } }
    func add(directory path: String) { entries.withLock { _ = $0.directories.insert(path) } }
    func remove(directory path: String) { entries.withLock { _ = $0.directories.remove(path) } }

    /// Sends SIGTERM to every registered child, waits up to 2 s for them, SIGKILLs the rest, and
    /// removes the directories. Holds the lock throughout, so no child is reaped (and its PID
    /// reused) by another thread while this signals it.
    func cleanUpAll() {
        entries.withLock { entries in
            for pid in entries.children { kill(pid, SIGTERM) }
            var remaining = entries.children
            for _ in 0..<200 where !remaining.isEmpty {
                remaining = remaining.filter { waitpid($0, nil, WNOHANG) == 0 }
                usleep(10_000)
            }
            for pid in remaining {
                kill(pid, SIGKILL)
                waitpid(pid, nil, 0)
            }
            entries.children = []
            for path in entries.directories { TemporaryDirectory.removeTree(path) }
            entries.directories = []
        }
    }
}

let cleanupRegistry = CleanupRegistry()

/// A child process the bench started and owns until `stop`. Used from the bench's main thread.
///
/// The child's stdin is a pipe whose write end only the bench holds: when the bench closes it (or
/// dies, even by SIGKILL), a role child reads end of file and stops itself. Its stdout is either
/// captured (roles announce their addresses there) or sent to a file (HAProxy's log).
final class ChildProcess {
    let name: String
    let pid: pid_t
    private var stdinWriter: Descriptor
    private var stdoutReader: Descriptor
    private var received: [UInt8] = []
    private(set) var exitStatus: CInt?

    private init(name: String, pid: pid_t, stdinWriter: consuming Descriptor, stdoutReader: consuming Descriptor) {
        self.name = name
        self.pid = pid
        self.stdinWriter = stdinWriter
        self.stdoutReader = stdoutReader
    }

    /// Starts `path` with `arguments` (its signal mask emptied and SIGPIPE, SIGINT, SIGTERM reset
    /// to their defaults, whatever the bench does with them). With `logFile`, stdout and stderr go
    /// there; otherwise stdout is captured for `readLine` and stderr is the bench's.
    static func spawn(name: String, path: String, arguments: [String], logFile: String? = nil) throws(BenchError) -> ChildProcess {
        let stdinPipe = try makePipe()
        let stdoutPipe: (read: CInt, write: CInt)
        do {
            stdoutPipe = try makePipe()
        } catch {
            Glibc.close(stdinPipe.read)
            Glibc.close(stdinPipe.write)
            throw error
        }
        // The bench keeps the other ends; these are the child's only.
        defer {
            Glibc.close(stdinPipe.read)
            Glibc.close(stdoutPipe.write)
        }
        // The child's ends become its fd 0 and 1 (dup2 clears close-on-exec there); they block.
        _ = cberth_fcntl_int(stdinPipe.read, F_SETFL, 0)
        _ = cberth_fcntl_int(stdoutPipe.write, F_SETFL, 0)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, stdinPipe.read, 0)
        if let logFile {
            posix_spawn_file_actions_addopen(&actions, 1, logFile, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        } else {
            posix_spawn_file_actions_adddup2(&actions, stdoutPipe.write, 1)
        }
        // Nothing else of the bench's: not every descriptor it holds is close-on-exec (a client
        // socket of its own was found held open by every fleet host).
        _ = cberth_spawn_closefrom(&actions, 3)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attributes, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGINT, SIGTERM, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let words = [path] + arguments
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { for word in argv { free(word) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, &actions, &attributes, argv, environ)
        guard result == 0 else {
            Glibc.close(stdinPipe.write)
            Glibc.close(stdoutPipe.read)
            throw .child("\(name): cannot start \(path): \(String(cString: strerror(result)))")
        }
        cleanupRegistry.add(child: pid)
        return ChildProcess(name: name, pid: pid, stdinWriter: Descriptor(adopting: stdinPipe.write),
                            stdoutReader: Descriptor(adopting: stdoutPipe.read))
    }

    private static func makePipe() throws(BenchError) -> (read: CInt, write: CInt) {
        var fds: (CInt, CInt) = (-1, -1)
        let created = withUnsafeMutablePointer(to: &fds) {
            $0.withMemoryRebound(to: CInt.self, capacity: 2) { cberth_pipe2($0) }
        }
        guard created == 0 else { throw .system(SystemError(call: "pipe2", errno: errno)) }
        return (fds.0, fds.1)
    }

    /// The next line the child writes on stdout, waiting at most `timeout` ms for it. Throws if
    /// the child closes stdout (exits) or stays silent.
    func readLine(timeout: Int64) throws(BenchError) -> String {
        let deadline = MonotonicClock.milliseconds() + timeout
        var buffer = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<10_000 {
            if let newline = received.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: received[..<newline], as: UTF8.self)
                received.removeSubrange(...newline)
                return line
            }
            let remaining = deadline - MonotonicClock.milliseconds()
            guard remaining > 0 else { break }
            var poller = pollfd(fd: stdoutReader.raw, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, CInt(clamping: remaining))
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { Glibc.read(stdoutReader.raw, $0.baseAddress, $0.count) }
            if count > 0 {
                received.append(contentsOf: buffer[0..<count])
            } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                usleep(20_000)
                _ = hasExited()
                throw .child("\(name) (pid \(pid)) closed its output\(exitStatus.map { ", exit status \($0)" } ?? "")")
            }
        }
        throw .child("\(name) (pid \(pid)) said nothing for \(timeout) ms")
    }

    /// Writes `text` to the child's stdin (a role that answers there, such as `listeners`).
    /// False when the pipe is closed or full.
    func send(_ text: String) -> Bool {
        guard stdinWriter.isOpen else { return false }
        var bytes = Array(text.utf8)
        let written = bytes.withUnsafeMutableBytes { Glibc.write(stdinWriter.raw, $0.baseAddress, $0.count) }
        return written == bytes.count
    }

    /// Whether the child has ended (reaps it if so).
    func hasExited() -> Bool {
        if exitStatus != nil { return true }
        var status: CInt = 0
        guard waitpid(pid, &status, WNOHANG) == pid else { return false }
        exitStatus = status
        cleanupRegistry.remove(child: pid)
        return true
    }

    /// Stops the child: closes its stdin, sends SIGTERM, waits up to `grace` ms, then SIGKILL.
    /// Idempotent. Signals this child's PID only, and only before reaping it.
    func stop(grace: Int64 = 3_000) {
        stdinWriter.close()
        stdoutReader.close()
        guard !hasExited() else { return }
        kill(pid, SIGTERM)
        let deadline = MonotonicClock.milliseconds() + grace
        while MonotonicClock.milliseconds() < deadline {
            if hasExited() { return }
            usleep(5_000)
        }
        progress("\(name) (pid \(pid)) ignored SIGTERM for \(grace) ms: SIGKILL")
        kill(pid, SIGKILL)
        var status: CInt = 0
        waitpid(pid, &status, 0)
        exitStatus = status
        cleanupRegistry.remove(child: pid)
    }

    deinit {
        stop()
    }
}

/// A directory made with mkdtemp under /tmp, registered for cleanup; `remove` deletes it and
/// everything in it (etcd's data directory, in the discovery scenario, has subdirectories).
struct TemporaryDirectory {
    let path: String

    init(prefix: String) throws(BenchError) {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else { throw .system(SystemError(call: "mkdtemp", errno: errno)) }
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        cleanupRegistry.add(directory: path)
    }

    /// Writes `contents` to `name` inside the directory; returns the file's path.
    func write(_ name: String, contents: String) throws(BenchError) -> String {
        let file = "\(path)/\(name)"
        let fd = Glibc.open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .system(SystemError(call: "open", errno: errno)) }
        defer { Glibc.close(fd) }
        var bytes = Array(contents.utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0 && errno == EINTR { continue }
            guard written > 0 else { throw .system(SystemError(call: "write", errno: errno)) }
            offset += written
        }
        return file
    }

    func remove() {
        TemporaryDirectory.removeTree(path)
        cleanupRegistry.remove(directory: path)
    }

    /// Bounds of `removeTree`: how deep it descends, and entries per directory.
    private static let removeDepth = 8
    private static let removeEntries = 10_000

    /// Removes `path` and what is in it: files unlinked, subdirectories (not symbolic links)
    /// removed the same way, at most `removeDepth` levels down and `removeEntries` per level.
    static func removeTree(_ path: String, depth: Int = 0) {
        guard let directory = opendir(path) else { return }
        var names: [(name: String, isDirectory: Bool)] = []
        while names.count < removeEntries, let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append((name, entry.pointee.d_type == UInt8(DT_DIR))) }
        }
        closedir(directory)
        for (name, isDirectory) in names {
            if isDirectory && depth < removeDepth {
                removeTree("\(path)/\(name)", depth: depth + 1)
            } else {
                unlink("\(path)/\(name)")
            }
        }
        rmdir(path)
    }
}

/// The path of this executable, to start it again in a role.
func currentExecutablePath() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { return "/proc/self/exe" }
    return String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
