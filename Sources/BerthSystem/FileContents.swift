import Glibc

/// Whole files read at start-up or on a control-plane thread (blocking calls, never on a
/// worker): the state file, `--static-file`.
public enum FileContents {
    /// The bytes of the file at `path`. A file larger than `limit` bytes is refused with
    /// `EFBIG` (from the call `read`) rather than read in part; a missing one throws `ENOENT`
    /// from `open`.
    public static func read(_ path: String, limit: Int) throws(SystemError) -> [UInt8] {
        let fd = try syscallNonBlocking("open") { Glibc.open(path, O_RDONLY | O_CLOEXEC) }
        var file = Descriptor(adopting: fd)
        defer { file.close() }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let count = try syscallNonBlocking("read") { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            if count == 0 { return bytes }
            bytes += chunk[..<count]
            if bytes.count > limit { throw SystemError(call: "read", errno: EFBIG) }
        }
    }
}
