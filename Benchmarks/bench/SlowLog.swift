import Glibc

/// The latency workload's slow requests, appended to the file BERTH_BENCH_SLOW_LOG names (one
/// line per request: start in CLOCK_MONOTONIC ns, response time in ns, connection index; a
/// `# phase` line before each phase's requests). Off unless the variable is set.
enum SlowLog {
    /// Response time (ns) from which a request is logged: BERTH_BENCH_SLOW_US, default 500 µs;
    /// UInt64.max when no log is asked for.
    static let threshold: UInt64 = {
        guard getenv("BERTH_BENCH_SLOW_LOG") != nil else { return .max }
        guard let text = getenv("BERTH_BENCH_SLOW_US"), let micro = UInt64(String(cString: text)) else { return 500_000 }
        return micro * 1_000
    }()

    static func append(_ requests: [(startedAt: UInt64, elapsed: UInt64, connection: Int)]) {
        guard let path = getenv("BERTH_BENCH_SLOW_LOG") else { return }
        var text = "# phase \(requests.count) slow requests\n"
        for request in requests { text += "\(request.startedAt) \(request.elapsed) \(request.connection)\n" }
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            progress("BERTH_BENCH_SLOW_LOG: cannot open \(String(cString: path)): errno \(errno)")
            return
        }
        defer { close(fd) }
        let written = text.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        if written != text.utf8.count { progress("BERTH_BENCH_SLOW_LOG: short write") }
    }
}
