import BerthSystem
import Glibc

// `bench`: with `--role`, one of the processes a run starts (Roles.swift); otherwise the benchmark
// itself (Runner.swift runs it, Report.swift prints it). `bench --help` lists the flags.

/// Raises the soft open-file limit to the hard one, for this process and the children it starts:
/// keepalive-1000 holds 1,000 sockets in the load generator and twice that in a proxy.
func raiseOpenFileLimit() {
    var limit = rlimit()
    guard getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
    limit.rlim_cur = limit.rlim_max
    if setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) != 0 {
        progress("could not raise the open-file limit to \(limit.rlim_max): keepalive-1000 may fail")
    }
}

/// Runs the benchmark and prints its report; the exit status.
func runBenchmark(_ options: BenchOptions) -> Int32 {
    ignoreBrokenPipeSignal()
    raiseOpenFileLimit()
    // Interrupted (Ctrl-C, kill): stop every child by its PID and remove the temporary files.
    // Blocked before any thread exists, so that only the signal thread takes these signals.
    ProcessSignals.block([SIGINT, SIGTERM, SIGHUP])
    _ = OSThread(name: "bench-signals") {
        let signal = ProcessSignals.wait(for: [SIGINT, SIGTERM, SIGHUP])
        progress("signal \(signal): stopping the child processes")
        cleanupRegistry.cleanUpAll()
        _exit(128 + signal)
    }
    do {
        let result = try BenchmarkRunner(options: options).run()
        let report = Report(result)
        writeOut(options.json ? report.json() : report.text())
        return 0
    } catch {
        progress("\(error)")
        return 1
    }
}

let status: Int32
do {
    switch try CommandLineParser.parse(Array(CommandLine.arguments.dropFirst())) {
    case .help:
        writeOut(benchUsage + "\n")
        status = 0
    case .role(let options):
        status = RoleMain.run(options)
    case .benchmark(let options):
        status = runBenchmark(options)
    }
} catch {
    progress("\(error) (bench --help lists the flags)")
    status = 64
}
exit(status)
