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

/// The number of CPUs this process may run on (the default number of workers).
public func availableCPUCount() -> Int {
    Int(sysconf(CInt(_SC_NPROCESSORS_ONLN)))
}

/// Open-file limit of the process (soft).
public func openFileLimit() -> Int {
    var limit = rlimit()
    getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
    return Int(limit.rlim_cur)
}
