import BerthEngine
import BerthSystem
import BerthWhoami
import Glibc

/// The processes the benchmark starts by re-executing itself with `--role` (so that the proxy's
/// CPU time and memory can be read from /proc, apart from the load generator's).
///
/// Contract with the bench (`ChildProcess`): on stdout, one `listening NAME HOST:PORT` line per
/// address served, then `ready`; then the role serves until SIGTERM or SIGINT, or until its stdin
/// reaches end of file (the bench closed its end, or died). Exit status 0 after a clean stop,
/// 1 when it could not start (the reason on stderr).
enum RoleMain {
    static func run(_ options: RoleOptions) -> Int32 {
        // Before any thread exists, so that every thread inherits the mask (and the CPU).
        ProcessSignals.block([SIGTERM, SIGINT])
        if options.role != .proxy, let cpu = options.cpu, !pinCurrentThread(toCPU: cpu) {
            progress("\(options.role.rawValue): cannot pin to CPU \(cpu); running unpinned")
        }
        do throws(BenchError) {
            switch options.role {
            case .proxy: try runProxy(options)
            case .whoami: try runWhoami(options)
            case .bulk: try runBulk(options)
            case .watchdog: runWatchdog(options)
            case .listeners: try ListenersRole.run(options)
            case .statsFuzz: try StatsFuzzRole.run(options)
            }
            return 0
        } catch {
            progress("\(options.role.rawValue): \(error)")
            return 1
        }
    }

    /// Berth's engine as the benchmark runs it: one worker pinned to `--cpu` (default 0), the
    /// relay mode asked for, one frontend per `--frontend` (round-robin over its backends).
    private static func runProxy(_ options: RoleOptions) throws(BenchError) {
        var configuration = EngineConfiguration()
        configuration.workers = 1
        configuration.cpus = [options.cpu ?? 0]
        configuration.relay = options.relay
        let engine: Engine
        do {
            engine = try Engine(configuration: configuration)
        } catch {
            throw .system(error)
        }
        let frontends = options.frontends.compactMap { spec -> Frontend? in
            guard let listen = spec.listen else { return nil }
            return Frontend(name: spec.name, listen: listen, backends: spec.backends.map { Backend($0) })
        }
        let result: Engine.ApplyResult
        do {
            result = try engine.apply(RoutingTable(revision: 1, frontends: frontends))
        } catch {
            engine.shutdown(drainTimeout: 0)
            throw .child("cannot apply the routing table: \(error)")
        }
        if let (name, failure) = result.failures.first {
            engine.shutdown(drainTimeout: 0)
            throw .child("frontend \(name) cannot listen: \(failure)")
        }
        announce(frontends.compactMap { frontend in result.listening[frontend.name].map { (frontend.name, $0) } })
        waitForStop()
        engine.shutdown(drainTimeout: 0)
    }

    private static func runWhoami(_ options: RoleOptions) throws(BenchError) {
        guard let listen = options.listen else { throw .child("--listen is required") }
        let server: WhoamiServer
        do {
            server = try WhoamiServer(listen: listen, identity: options.name, threads: 1, acceptProxy: options.acceptProxy)
        } catch {
            throw .system(error)
        }
        announce([(options.name, server.address)])
        waitForStop()
        server.stop()
    }

    private static func runBulk(_ options: RoleOptions) throws(BenchError) {
        guard let listen = options.listen else { throw .child("--listen is required") }
        let server: BulkServer
        do {
            server = try BulkServer(listen: listen)
        } catch {
            throw .system(error)
        }
        announce([(options.name, server.address)])
        waitForStop()
        server.stop()
    }

    /// Announces itself, then waits: on SIGTERM or SIGINT (the bench stops it first, before
    /// stopping the watched process itself) it exits quietly; on end of file on stdin (the bench
    /// died) it stops the watched process by its PID and removes the temporary directory.
    private static func runWatchdog(_ options: RoleOptions) {
        guard let pid = options.watchedPID else { return }
        let directory = options.removeDirectory
        _ = OSThread(name: "bench-watchdog") {
            var byte: UInt8 = 0
            for _ in 0..<1_000 {
                let count = Glibc.read(0, &byte, 1)
                if count == 0 || (count < 0 && errno != EINTR) { break }
            }
            kill(pid, SIGTERM)
            // Not our child: poll for its disappearance (up to 3 s), then SIGKILL.
            for _ in 0..<300 where kill(pid, 0) == 0 { usleep(10_000) }
            if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
            if let directory { TemporaryDirectory.removeTree(directory) }
            _exit(0)
        }
        writeOut("ready\n")
        _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
    }

    /// The announcement the bench waits for, in one write.
    private static func announce(_ addresses: [(String, SocketAddress)]) {
        writeOut(addresses.map { "listening \($0.0) \($0.1)\n" }.joined() + "ready\n")
    }

    /// Blocks until SIGTERM or SIGINT. When stdin is a pipe (as the bench sets it up), a helper
    /// thread turns its end of file (the bench is gone) into a SIGTERM to this process, so that
    /// no role outlives the bench. Started by hand with another stdin, a role just waits.
    private static func waitForStop() {
        if FileStatus.isPipe(0) { watchStdin() }
        _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
    }

    private static func watchStdin() {
        _ = OSThread(name: "bench-parent") {
            var byte: UInt8 = 0
            // Each read blocks until the bench writes (it never does) or its end closes.
            for _ in 0..<1_000 {
                let count = Glibc.read(0, &byte, 1)
                if count == 0 || (count < 0 && errno != EINTR) { break }
            }
            kill(getpid(), SIGTERM)
        }
    }
}
