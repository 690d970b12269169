import CBerthShims
import Glibc

/// A joinable OS thread running one closure (the event loops; no thread pool, no Foundation).
public struct OSThread {
    public let handle: pthread_t

    private final class Start {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        var handle = pthread_t()
        let start = Unmanaged.passRetained(Start(body)).toOpaque()
        let result = pthread_create(&handle, nil, { argument in
            let start = Unmanaged<Start>.fromOpaque(argument!).takeRetainedValue()
            start.body()
            return nil
        }, start)
        precondition(result == 0, "pthread_create failed: \(result)")
        _ = cberth_set_thread_name(handle, String(name.prefix(15)))
        self.handle = handle
    }

    /// Waits for the thread to end. Call once.
    public func join() {
        _ = pthread_join(handle, nil)
    }
}

/// Pins the calling thread to one CPU. Returns false when the kernel refuses.
@discardableResult
public func pinCurrentThread(toCPU cpu: Int) -> Bool {
    cberth_pin_to_cpu(CInt(cpu)) == 0
}

/// Sets the calling thread's nice value (Linux: this thread alone). A control-plane thread
/// made nicer than the workers yields the CPU to them when both want it. Returns false when the
/// kernel refuses (lowering it below the current value needs privilege).
@discardableResult
public func setCurrentThreadNice(_ nice: Int) -> Bool {
    cberth_set_thread_nice(CInt(nice)) == 0
}

/// Pins another thread (its kernel id, as listed in /proc/PID/task) to one CPU. Returns false
/// when the kernel refuses (no such thread, no permission).
@discardableResult
public func pinThread(_ tid: pid_t, toCPU cpu: Int) -> Bool {
    cberth_pin_task_to_cpu(CInt(tid), CInt(cpu)) == 0
}

/// Process-wide signal handling for the commands: block `signals` in this thread (do it before
/// any thread is created, so that every thread inherits the mask), then `waitForSignal` takes
/// them synchronously on one thread.
public enum ProcessSignals {
    public static func block(_ signals: [CInt]) {
        _ = signals.withUnsafeBufferPointer { cberth_block_signals($0.baseAddress, CInt($0.count)) }
    }

    public static func wait(for signals: [CInt]) -> CInt {
        signals.withUnsafeBufferPointer { cberth_wait_signal($0.baseAddress, CInt($0.count)) }
    }
}

/// The number of CPUs this process may run on (the default number of workers): the CPUs of its
/// affinity mask (`taskset`, `docker run --cpuset-cpus`), capped by its cgroup's CPU quota rounded
/// up (`docker run --cpus 2` on a 64-core host: 2), as SwiftNIO's `System.coreCount` reads them.
public func availableCPUCount() -> Int {
    let online = Int(sysconf(CInt(_SC_NPROCESSORS_ONLN)))
    let affinity = Int(cberth_affinity_cpu_count())
    var count = affinity > 0 ? affinity : max(1, online)
    if let quota = CPUQuota.current() { count = min(count, quota) }
    return max(1, count)
}

/// The CPU quota of this process's cgroup, in whole CPUs (rounded up); nil when there is none.
public enum CPUQuota {
    public static func current() -> Int? {
        let own = (try? readSmallFile("/proc/self/cgroup")) ?? ""
        // cgroup v2: "0::/path"; the file under the unified hierarchy (or its root, inside a
        // container's cgroup namespace).
        if let line = own.split(separator: "\n").first(where: { $0.hasPrefix("0::") }) {
            let path = String(line.dropFirst(3))
            for file in ["/sys/fs/cgroup\(path)/cpu.max", "/sys/fs/cgroup/cpu.max"] {
                if let text = try? readSmallFile(file) { return parseV2(text) }
            }
        }
        // cgroup v1: the cpu controller's quota and period.
        if let quota = try? readSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
           let period = try? readSmallFile("/sys/fs/cgroup/cpu/cpu.cfs_period_us") {
            return parseV1(quota: quota, period: period)
        }
        return nil
    }

    /// `cpu.max`: "max 100000" (none) or "QUOTA PERIOD" in microseconds.
    public static func parseV2(_ text: String) -> Int? {
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count >= 2, fields[0] != "max", let quota = Int(fields[0]), let period = Int(fields[1]) else { return nil }
        return cpus(quota: quota, period: period)
    }

    /// `cpu.cfs_quota_us` (-1: none) and `cpu.cfs_period_us`.
    public static func parseV1(quota: String, period: String) -> Int? {
        guard let quota = Int(quota.filter { $0 != "\n" && $0 != " " }),
              let period = Int(period.filter { $0 != "\n" && $0 != " " }) else { return nil }
        return cpus(quota: quota, period: period)
    }

    private static func cpus(quota: Int, period: Int) -> Int? {
        guard quota > 0, period > 0 else { return nil }
        return max(1, (quota + period - 1) / period)
    }
}

/// The whole of a small text file (a /proc or /sys entry), read with plain system calls.
func readSmallFile(_ path: String) throws(SystemError) -> String {
    let fd = try syscallNonBlocking("open") { open(path, O_RDONLY | O_CLOEXEC) }
    defer { closeDescriptor(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while bytes.count < 65_536 {
        let count = try syscallNonBlocking("read") { buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
        if count == 0 { break }
        bytes += buffer[0..<count]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Open-file limit of the process (soft).
public func openFileLimit() -> Int {
    var limit = rlimit()
    getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    return Int(limit.rlim_cur)
}
