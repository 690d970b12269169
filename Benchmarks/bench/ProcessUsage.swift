import BerthSystem
import Glibc

/// Busy and total time of one CPU, in clock ticks, from `/proc/stat`.
struct CPUTime: Sendable {
    /// user + nice + system + irq + softirq.
    var busy: UInt64
    /// user + nice + system: the part that is charged to some process.
    var tasks: UInt64
    /// Time the hypervisor ran something else while this (virtual) CPU wanted to run.
    var steal: UInt64
    /// busy + idle + iowait + steal.
    var total: UInt64
}

/// What is read at each edge of a measured window: the time, the proxy's CPU ticks, and every
/// CPU's time. The differences between two snapshots are the window's figures.
struct ResourceSnapshot: Sendable {
    var nanoseconds: UInt64
    var proxyTicks: UInt64?
    /// CPU ticks of the bench's own processes: the load generator and the backends.
    var ownTicks: UInt64
    var cpus: [CPUTime]

    /// Takes a snapshot; `proxy` is the process under test (nil for the direct setup), `own`
    /// the backends (this process is added).
    static func take(proxy: pid_t?, own: [pid_t]) -> ResourceSnapshot {
        ResourceSnapshot(
            nanoseconds: MonotonicClock.nanoseconds(),
            proxyTicks: proxy.flatMap { ProcFS.cpuTicks(of: $0) },
            ownTicks: ([getpid()] + own).reduce(0) { $0 + (ProcFS.cpuTicks(of: $1) ?? 0) },
            cpus: ProcFS.cpuTimes())
    }

    /// CPUs' worth of time (0...count) that processes other than the bench's and the proxy's
    /// used between `start` and this snapshot: a measure of how disturbed the figures are.
    /// Interrupt time is left out on both sides, so this errs low.
    func foreignCPUs(since start: ResourceSnapshot) -> Double {
        let seconds = Double(nanoseconds &- start.nanoseconds) / 1e9
        guard seconds > 0 else { return 0 }
        let tasks = zip(start.cpus, cpus).reduce(UInt64(0)) { $0 + ($1.1.tasks &- $1.0.tasks) }
        let ours = (ownTicks &- start.ownTicks) + ((proxyTicks ?? 0) &- (start.proxyTicks ?? 0))
        return max(0, Double(tasks) - Double(ours)) / ProcFS.ticksPerSecond / seconds
    }

    /// CPU seconds the proxy used between `start` and this snapshot.
    func proxyCPUSeconds(since start: ResourceSnapshot) -> Double? {
        guard let end = proxyTicks, let begin = start.proxyTicks, end >= begin else { return nil }
        return Double(end - begin) / ProcFS.ticksPerSecond
    }

    /// Per CPU, the busy share (0...1) between `start` and this snapshot.
    func busyShares(since start: ResourceSnapshot) -> [Double] {
        zip(start.cpus, cpus).map { begin, end in
            let total = end.total &- begin.total
            return total == 0 ? 0 : Double(end.busy &- begin.busy) / Double(total)
        }
    }

    /// Per CPU, the share (0...1) the hypervisor stole between `start` and this snapshot.
    func stealShares(since start: ResourceSnapshot) -> [Double] {
        zip(start.cpus, cpus).map { begin, end in
            let total = end.total &- begin.total
            return total == 0 ? 0 : Double(end.steal &- begin.steal) / Double(total)
        }
    }
}

/// Readers of the few /proc files the bench needs. Every read is bounded (`fileLimit` bytes)
/// and returns nil rather than failing: a figure that cannot be read is printed as "-".
enum ProcFS {
    static let ticksPerSecond = Double(max(1, sysconf(CInt(_SC_CLK_TCK))))
    static let fileLimit = 1 << 20

    /// The whole of a small file, or nil.
    static func read(_ path: String) -> String? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 8192)
        while bytes.count < fileLimit {
            let count = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// utime + stime of every thread of `pid` (fields 14 and 15 of /proc/PID/stat, counted
    /// after the parenthesised command name, which may itself contain spaces).
    static func cpuTicks(of pid: pid_t) -> UInt64? {
        guard let text = read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // fields[0] is the state (field 3), so field N is fields[N - 3].
        guard fields.count > 12, let user = UInt64(fields[11]), let system = UInt64(fields[12]) else { return nil }
        return user + system
    }

    /// Peak resident set size of `pid` in bytes (VmHWM of /proc/PID/status).
    static func peakResidentBytes(of pid: pid_t) -> UInt64? {
        statusKilobytes(of: pid, field: "VmHWM:").map { $0 * 1024 }
    }

    /// Resident set size of `pid` now, in bytes (VmRSS of /proc/PID/status).
    static func residentBytes(of pid: pid_t) -> UInt64? {
        statusKilobytes(of: pid, field: "VmRSS:").map { $0 * 1024 }
    }

    /// A `kB` line of /proc/PID/status (`field` with its colon).
    private static func statusKilobytes(of pid: pid_t, field: String) -> UInt64? {
        guard let text = read("/proc/\(pid)/status") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(field) {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            guard parts.count >= 2, let kilobytes = UInt64(parts[1]) else { return nil }
            return kilobytes
        }
        return nil
    }

    /// Time of each CPU (the `cpuN` lines of /proc/stat), indexed by CPU number.
    static func cpuTimes() -> [CPUTime] {
        guard let text = read("/proc/stat") else { return [] }
        var times: [CPUTime] = []
        for line in text.split(separator: "\n") where line.hasPrefix("cpu") && !line.hasPrefix("cpu ") {
            let values = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
            guard values.count >= 8 else { continue }
            // user nice system idle iowait irq softirq steal
            let tasks = values[0] + values[1] + values[2]
            let busy = tasks + values[5] + values[6]
            times.append(CPUTime(busy: busy, tasks: tasks, steal: values[7], total: busy + values[3] + values[4] + values[7]))
        }
        return times
    }

    /// A field of the `Tcp:` counters of /proc/net/snmp (`AttemptFails`: connects that failed,
    /// refused ones included; `ActiveOpens`: connects started). Counted for the whole network
    /// namespace, so other processes' connections count too.
    static func tcpCounter(_ name: String) -> UInt64? {
        guard let text = read("/proc/net/snmp") else { return nil }
        let lines = text.split(separator: "\n").filter { $0.hasPrefix("Tcp:") }
        guard lines.count == 2 else { return nil }
        let names = lines[0].split(separator: " ")
        let values = lines[1].split(separator: " ")
        guard let index = names.firstIndex(where: { $0 == name }), index < values.count else { return nil }
        return UInt64(values[index])
    }

    /// utime + stime of the threads of `pid` whose name (`comm`) is `name`.
    static func threadTicks(of pid: pid_t, named name: String) -> UInt64? {
        var total: UInt64?
        for task in threads(of: pid) where task.name == name {
            guard let text = read("/proc/\(pid)/task/\(task.tid)/stat"), let close = text.lastIndex(of: ")") else { continue }
            let fields = text[text.index(after: close)...].split(separator: " ")
            guard fields.count > 12, let user = UInt64(fields[11]), let system = UInt64(fields[12]) else { continue }
            total = (total ?? 0) + user + system
        }
        return total
    }

    /// CPU seconds between two tick readings taken at a window's edges (`threadTicks`,
    /// `cpuTicks`); nil unless both were read and in order.
    static func cpuSeconds(between readings: [UInt64?]) -> Double? {
        guard readings.count == 2, let first = readings[0], let last = readings[1], last >= first else { return nil }
        return Double(last - first) / ticksPerSecond
    }

    /// The threads of `pid` (at most 4,096): kernel id and name (`comm`).
    static func threads(of pid: pid_t) -> [(tid: pid_t, name: String)] {
        guard let directory = opendir("/proc/\(pid)/task") else { return [] }
        var tasks: [pid_t] = []
        while tasks.count < 4_096, let entry = readdir(directory) {
            let task = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let tid = pid_t(task) { tasks.append(tid) }
        }
        closedir(directory)
        return tasks.compactMap { tid in
            read("/proc/\(pid)/task/\(tid)/comm")?.split(separator: "\n").first.map { (tid, String($0)) }
        }
    }

    /// The nice value of one thread of `pid` (field 19 of its stat), or nil.
    static func nice(of pid: pid_t, thread tid: pid_t) -> Int? {
        guard let text = read("/proc/\(pid)/task/\(tid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        return fields.count > 16 ? Int(fields[16]) : nil
    }

    /// Open file descriptors of `pid` (at most 1,000,000 counted), or nil.
    static func openDescriptors(of pid: pid_t) -> Int? {
        guard let directory = opendir("/proc/\(pid)/fd") else { return nil }
        defer { closedir(directory) }
        var count = 0
        while count < 1_000_002, let entry = readdir(directory) {
            if entry.pointee.d_name.0 != UInt8(ascii: ".") { count += 1 }
        }
        return count
    }

    /// The running kernel's release, for the report header.
    static func kernelRelease() -> String {
        read("/proc/sys/kernel/osrelease")?.split(separator: "\n").first.map(String.init) ?? "unknown"
    }

    /// The CPU model, for the report header.
    static func cpuModel() -> String {
        guard let text = read("/proc/cpuinfo") else { return "unknown" }
        for line in text.split(separator: "\n") where line.hasPrefix("model name") {
            if let colon = line.firstIndex(of: ":") {
                return String(line[line.index(after: colon)...].drop { $0 == " " })
            }
        }
        return "unknown"
    }
}
