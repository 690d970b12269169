import BerthEngine
import BerthSystem
import Glibc
import Logging
import Synchronization

/// Reading and atomically replacing the state file (`--state-file`). Blocking calls: only on the
/// writer's thread or at start-up, never on a worker.
public enum StateFileStorage {
    /// A larger file is not one Berth wrote (a table of 100,000 backends is about 10 MB).
    public static let sizeLimit = 64 << 20

    /// The file's bytes; nil when it does not exist.
    public static func read(_ path: String) throws(SystemError) -> [UInt8]? {
        do {
            return try FileContents.read(path, limit: sizeLimit)
        } catch where error.call == "open" && error.errno == ENOENT {
            return nil
        }
    }

    /// Writes `bytes` to a temporary file in the same directory, fsyncs it, renames it over
    /// `path` and fsyncs the directory: a reader sees the old file or the new one, never a mix,
    /// and after a crash the rename has either happened with the data or not at all.
    public static func replace(_ path: String, with bytes: [UInt8]) throws(SystemError) {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let temporary = "\(path).tmp.\(getpid())"
        let fd = try syscallNonBlocking("open") { Glibc.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
        var file = Descriptor(adopting: fd)
        do throws(SystemError) {
            var written = 0
            while written < bytes.count {
                written += try syscallNonBlocking("write") {
                    bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + written, $0.count - written) }
                }
            }
            try syscallNonBlocking("fsync") { Glibc.fsync(fd) }
            file.close()
            try syscallNonBlocking("rename") { Glibc.rename(temporary, path) }
        } catch {
            file.close()
            _ = Glibc.unlink(temporary)
            throw error
        }
        let directoryFD = try syscallNonBlocking("open") { Glibc.open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        var directoryFile = Descriptor(adopting: directoryFD)
        defer { directoryFile.close() }
        try syscallNonBlocking("fsync") { Glibc.fsync(directoryFD) }
    }

    /// Unix time now, in seconds.
    public static func now() -> Int64 {
        Int64(Glibc.time(nil))
    }
}

/// Keeps the state file following the applied state: `submit` (any thread, cheap: it stores the
/// state and signals) hands the newest state to the writer's own thread (`berth-state`, never a
/// data-plane worker), which writes it when it differs from the last one written, at most once a
/// second: the first change after a quiet second is written at once, a burst after it once at the
/// end of that second, with the burst's last state. A failed write is logged and counted, and the
/// state is tried again on the next change or the next second; never fatal.
public final class StateFileWriter: @unchecked Sendable {
    public let path: String
    /// Minimum time between two writes (ms).
    public let interval: Int64
    private let logger: Logger
    /// Guards the fields below it.
    private let condition = ConditionLock()
    private var pending: SavedState?
    private var stopping = false
    private var finished = false
    /// The last state written (its `savedAt` zeroed), to skip unchanged ones.
    private var lastWritten: SavedState?
    private let writeCount = Atomic<UInt64>(0)
    private let failureCount = Atomic<UInt64>(0)

    /// `written`: the state already in the file (as loaded at start), so an unchanged table is
    /// not written again.
    public init(path: String, written: SavedState? = nil, interval: Int64 = 1_000, logger: Logger = Logger(label: "berth.state")) {
        self.path = path
        self.interval = interval
        self.logger = logger
        lastWritten = written.map { var state = $0; state.savedAt = 0; return state }
        _ = OSThread(name: "berth-state") { [self] in run() }
    }

    public var writes: UInt64 { writeCount.load(ordering: .relaxed) }
    public var failures: UInt64 { failureCount.load(ordering: .relaxed) }

    public func submit(_ state: SavedState) {
        condition.withLock { pending = state }
        condition.signal()
    }

    /// Writes what is pending (if it changed) and ends the thread; waits for it.
    public func stop() {
        condition.withLock { stopping = true }
        condition.signal()
        condition.lock()
        while !finished { _ = condition.wait(milliseconds: 100) }
        condition.unlock()
    }

    private func run() {
        var lastWrite: Int64?
        condition.lock()
        while true {
            while pending == nil && !stopping { condition.wait() }
            // At most one write per interval: wait out the rest of it (a stop ends the wait).
            while let last = lastWrite, !stopping {
                let left = last + interval - MonotonicClock.milliseconds()
                if left <= 0 { break }
                _ = condition.wait(milliseconds: left)
            }
            let state = pending
            pending = nil
            let previous = lastWritten
            let stop = stopping
            condition.unlock()
            if var state {
                state.savedAt = 0
                if state != previous {
                    lastWrite = MonotonicClock.milliseconds()
                    let written = write(state)
                    // A failed write is tried again a second later, unless a newer state came.
                    condition.withLock {
                        if written { lastWritten = state } else if pending == nil && !stopping { pending = state }
                    }
                }
            }
            condition.lock()
            if stop && pending == nil { break }
        }
        finished = true
        condition.unlock()
        condition.signal()
    }

    private func write(_ state: SavedState) -> Bool {
        var stamped = state
        stamped.savedAt = StateFileStorage.now()
        do {
            try StateFileStorage.replace(path, with: StateFile.encode(stamped))
            writeCount.add(1, ordering: .relaxed)
            logger.debug("state file written", metadata: ["path": "\(path)", "revision": "\(state.table.revision)"])
            return true
        } catch {
            let failures = failureCount.add(1, ordering: .relaxed).newValue
            if failures <= 10 || failures % 100 == 0 {
                logger.error("state file \(path): cannot write: \(error) (\(failures) failure(s); serving goes on)")
            }
            return false
        }
    }
}
