import Glibc

/// What `stat(2)` says of a file, for the few callers outside the data plane that ask (the
/// bench's roles and launcher). Here rather than at each caller: Swift 6.3.1 release builds of a
/// target with MemberImportVisibility take Glibc's `stat` struct for the copies other clang
/// modules (CoreFoundation's) carry and then refuse its fields.
public enum FileStatus {
    /// Whether `fd` is a pipe (FIFO).
    public static func isPipe(_ fd: CInt) -> Bool {
        var status = stat()
        return fstat(fd, &status) == 0 && status.st_mode & S_IFMT == S_IFIFO
    }

    /// The file's modification time, whole seconds since the epoch; nil when it cannot be read.
    public static func modificationTime(_ path: String) -> Int? {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        return Int(status.st_mtim.tv_sec)
    }
}
