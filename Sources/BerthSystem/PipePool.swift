import CBerthShims
import Glibc

/// A pipe used as the kernel-side buffer of a splice relay: bytes go socket → `input` end,
/// then `output` end → socket. A plain value: the `PipePool` that lent it owns the fds.
public struct Pipe: Equatable {
    /// The end spliced out of (toward the destination socket).
    public let output: CInt
    /// The end spliced into (from the source socket).
    public let input: CInt
}

/// A per-worker pool of pipes: the owner of every pipe fd of its worker.
///
/// Sessions borrow a pipe only while bytes are moving through it and give it back empty
/// (`release`), so idle connections hold no pipes. A pipe that still holds bytes when its session
/// ends is closed (`discard`), never reused. Bounds: at most `idleLimit` empty pipes are kept, and
/// at most `inUseLimit` are lent at once; past that `acquire` returns nil and the caller copies
/// through user space instead.
public struct PipePool: ~Copyable {
    /// Empty pipes, a stack of `idleLimit` slots (no Array: acquire/release run per chunk).
    private let idle: UnsafeMutablePointer<Pipe>
    public private(set) var idleCount = 0
    public private(set) var inUse = 0
    public let idleLimit: Int
    public let inUseLimit: Int
    /// Requested pipe capacity (F_SETPIPE_SZ); 0 keeps the kernel's default (64 KiB).
    public let pipeSize: Int
    /// Capacity of the pipes actually created (what one splice may move).
    public private(set) var capacity: Int = 65536

    public init(idleLimit: Int = 64, inUseLimit: Int = 4096, pipeSize: Int = 0) {
        self.idleLimit = max(0, idleLimit)
        self.inUseLimit = inUseLimit
        self.pipeSize = pipeSize
        idle = UnsafeMutablePointer<Pipe>.allocate(capacity: max(1, idleLimit))
    }

    deinit {
        for index in 0..<idleCount {
            closeDescriptor(idle[index].input)
            closeDescriptor(idle[index].output)
        }
        idle.deallocate()
    }

    /// Lends an empty pipe, creating one if none is idle; nil when the bound is reached or the
    /// process is out of fds.
    public mutating func acquire() -> Pipe? {
        if idleCount > 0 {
            idleCount -= 1
            inUse += 1
            return idle[idleCount]
        }
        guard inUse < inUseLimit else { return nil }
        var fds: (CInt, CInt) = (-1, -1)
        // EMFILE and the like: no pipe now, and the caller copies through user space instead.
        guard (try? syscallNonBlocking("pipe2", {
            withUnsafeMutablePointer(to: &fds) {
                $0.withMemoryRebound(to: CInt.self, capacity: 2) { cberth_pipe2($0) }
            }
        })) != nil else { return nil }
        if pipeSize > 0 {
            // EPERM above /proc/sys/fs/pipe-max-size for an unprivileged user: the default size.
            _ = try? syscallNonBlocking("fcntl(F_SETPIPE_SZ)") {
                cberth_fcntl_int(fds.1, CBERTH_F_SETPIPE_SZ, CInt(clamping: pipeSize))
            }
        }
        if let size = try? syscallNonBlocking("fcntl(F_GETPIPE_SZ)", { cberth_fcntl_int(fds.1, CBERTH_F_GETPIPE_SZ, 0) }),
           size > 0 {
            capacity = Int(size)
        }
        inUse += 1
        return Pipe(output: fds.0, input: fds.1)
    }

    /// Takes back an empty pipe.
    public mutating func release(_ pipe: Pipe) {
        inUse -= 1
        if idleCount < idleLimit {
            idle[idleCount] = pipe
            idleCount += 1
        } else {
            closeDescriptor(pipe.input)
            closeDescriptor(pipe.output)
        }
    }

    /// Closes a pipe that may still hold bytes.
    public mutating func discard(_ pipe: Pipe) {
        inUse -= 1
        closeDescriptor(pipe.input)
        closeDescriptor(pipe.output)
    }
}
