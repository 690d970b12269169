import BerthEngine
import BerthSystem
import Glibc

/// A child process serving addresses: a backend (whoami, bulk) or a proxy under test.
/// Owned by the runner; `stop` ends the process (by its PID) and removes its temporary files.
final class ServingProcess {
    let child: ChildProcess
    /// Address per name (`web`, `bulk` for a proxy; the backend's name for a backend).
    let addresses: [String: SocketAddress]
    private let directory: TemporaryDirectory?
    /// A watchdog role that stops `child` if the bench dies without stopping it.
    private let watchdog: ChildProcess?

    init(child: ChildProcess, addresses: [String: SocketAddress], directory: TemporaryDirectory? = nil,
         watchdog: ChildProcess? = nil) {
        self.child = child
        self.addresses = addresses
        self.directory = directory
        self.watchdog = watchdog
    }

    var pid: pid_t { child.pid }

    func address(_ name: String) throws(BenchError) -> SocketAddress {
        guard let address = addresses[name] else { throw .child("\(child.name) serves no '\(name)'") }
        return address
    }

    /// CPU seconds used so far, and the peak resident set: read before `stop` (a reaped process
    /// has no /proc entry).
    var cpuSeconds: Double? { ProcFS.cpuTicks(of: pid).map { Double($0) / ProcFS.ticksPerSecond } }
    var peakResidentBytes: UInt64? { ProcFS.peakResidentBytes(of: pid) }

    /// Stops the watchdog first (so that it never signals a PID this then reaps), then the child.
    /// `keepingLog`: a file the child's log (`startExternal`'s) is appended to first.
    func stop(keepingLog destination: String? = nil) {
        watchdog?.stop()
        child.stop()
        if let destination, let directory, let text = ProcFS.read("\(directory.path)/\(child.name).log") {
            let fd = open(destination, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            if fd >= 0 {
                var bytes = Array("--- \(child.name) (pid \(child.pid))\n\(text)".utf8)
                _ = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
            }
        }
        directory?.remove()
    }
}

/// Starting the processes of a run: the bench itself in a role, and HAProxy.
enum Launcher {
    /// How long a child may take to announce itself or open its ports.
    static let startTimeout: Int64 = 10_000

    /// Re-executes this binary with `--role` (under `wrapper`, a command such as valgrind, when
    /// not empty) and waits for its `listening`/`ready` lines.
    static func startRole(_ name: String, arguments: [String], wrapper: [String] = []) throws(BenchError) -> ServingProcess {
        let child: ChildProcess
        if let command = wrapper.first {
            guard let path = resolveCommand(command) else { throw .child("\(command): command not found") }
            child = try ChildProcess.spawn(name: name, path: path, arguments: wrapper.dropFirst() + [currentExecutablePath()] + arguments)
        } else {
            child = try ChildProcess.spawn(name: name, path: currentExecutablePath(), arguments: arguments)
        }
        // A profiler may take a while to load the program.
        let timeout = wrapper.isEmpty ? startTimeout : 12 * startTimeout
        var addresses: [String: SocketAddress] = [:]
        do throws(BenchError) {
            for _ in 0..<64 {
                let line = try child.readLine(timeout: timeout)
                if line == "ready" { return ServingProcess(child: child, addresses: addresses) }
                let words = line.split(separator: " ")
                guard words.count == 3, words[0] == "listening", let address = try? SocketAddress(parsing: String(words[2])) else {
                    throw BenchError.child("\(name) said '\(line)'")
                }
                addresses[String(words[1])] = address
            }
            throw BenchError.child("\(name) never said ready")
        } catch {
            child.stop()
            throw error
        }
    }

    /// A whoami backend on `cpu`, on `listen` (default: a free port of 127.0.0.1).
    static func startWhoami(name: String, cpu: Int, listen: SocketAddress? = nil, acceptProxy: Bool = false) throws(BenchError) -> ServingProcess {
        try startRole(name, arguments: ["--role", "whoami", "--name", name, "--listen", listen?.description ?? "127.0.0.1:0", "--cpu", "\(cpu)"]
            + (acceptProxy ? ["--accept-proxy"] : []))
    }

    /// The bulk backend on `cpu`.
    static func startBulk(name: String, cpu: Int) throws(BenchError) -> ServingProcess {
        try startRole(name, arguments: ["--role", "bulk", "--name", name, "--listen", "127.0.0.1:0", "--cpu", "\(cpu)"])
    }

    /// Berth's engine in a child process: one worker on `cpu`, frontends `web` (round-robin over
    /// `web`) and `bulk`.
    static func startBerth(relay: RelayMode, web: [SocketAddress], bulk: SocketAddress, cpu: Int,
                           wrapper: [String]) throws(BenchError) -> ServingProcess {
        try startRole("berth-\(relay.rawValue)", arguments: [
            "--role", "proxy", "--relay", relay.rawValue, "--cpu", "\(cpu)",
            "--frontend", "web", "--listen", "127.0.0.1:0", "--backend", web.map(\.description).joined(separator: ","),
            "--frontend", "bulk", "--listen", "127.0.0.1:0", "--backend", bulk.description,
        ], wrapper: wrapper)
    }

    /// The berth-default setup: `berth proxy` with its defaults but for its addresses, two
    /// workers, its stats server on a free port and TCP checks, on both CPUs (taskset 0,1: it
    /// shares them with the load generator and backends); frontend `web` over `web`.
    static func startBerthDefault(path: String, web: [SocketAddress]) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let address = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let stats = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            return try startExternal(name: "berth-default", path: path, arguments: [
                "proxy", "--listen", address.description, "--name", "web",
                "--backend", web.map(\.description).joined(separator: ","),
                "--workers", "2", "--stats", stats.description, "--check", "tcp",
            ], cpus: Setup.berthDefault.proxyCPUList(0), directory: directory, addresses: ["web": address, "stats": stats])
        } catch {
            directory.remove()
            throw error
        }
    }

    /// The haproxy-2t setup: the HAProxy configuration of the one-thread rows with `nbthread 2`
    /// (no CPU map: both CPUs, as for berth-default), a stats listener and checks.
    static func startHAProxyTwoThreads(path: String, web: [SocketAddress], bulk: SocketAddress) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let webAddress = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let bulkAddress = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let stats = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            var lines = haproxyConfiguration(spliceAuto: false, webPort: webAddress.port, bulkPort: bulkAddress.port,
                                             web: web, bulk: bulk, cpu: 0).split(separator: "\n").map(String.init)
            lines = lines.filter { !$0.contains("cpu-map") }.map { line in
                if line == "    nbthread 1" { return "    nbthread 2" }
                return line.hasPrefix("    server ") ? line + " check" : line
            }
            lines += ["listen stats", "    bind \(stats)", "    mode http", "    stats enable", "    stats uri /"]
            let configuration = try directory.write("haproxy-2t.cfg", contents: lines.joined(separator: "\n") + "\n")
            return try startExternal(name: "haproxy-2t", path: path, arguments: ["-db", "-f", configuration],
                                     cpus: Setup.haproxyTwoThreads.proxyCPUList(0),
                                     directory: directory, addresses: ["web": webAddress, "bulk": bulkAddress, "stats": stats])
        } catch {
            directory.remove()
            throw error
        }
    }

    /// `command` itself when it names a path, else the first executable of that name in PATH.
    static func resolveCommand(_ command: String) -> String? {
        if command.contains("/") { return access(command, X_OK) == 0 ? command : nil }
        guard let path = getenv("PATH") else { return nil }
        return String(cString: path).split(separator: ":").map { "\($0)/\(command)" }.first { access($0, X_OK) == 0 }
    }

    // MARK: HAProxy

    /// The HAProxy binary: `explicit`, else the first executable `haproxy` in the usual places.
    static func locateHAProxy(_ explicit: String?) -> String? {
        if let explicit { return access(explicit, X_OK) == 0 ? explicit : nil }
        let candidates: [String] = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        return candidates.first { access($0, X_OK) == 0 } ?? resolveCommand("haproxy")
    }

    /// The first line of `haproxy -v`, or nil.
    static func haproxyVersion(_ path: String) -> String? {
        guard let directory = try? TemporaryDirectory(prefix: "berth-bench") else { return nil }
        defer { directory.remove() }
        let log = "\(directory.path)/version.txt"
        guard let child = try? ChildProcess.spawn(name: "haproxy -v", path: path, arguments: ["-v"], logFile: log) else { return nil }
        for _ in 0..<500 where !child.hasExited() { usleep(10_000) }
        child.stop()
        return ProcFS.read(log)?.split(separator: "\n").first.map(String.init)
    }

    /// The `global` and `defaults` sections every HAProxy row shares: one thread on `cpu`,
    /// `mode tcp`, round-robin, Berth's default timeouts.
    static func haproxyPreamble(cpu: Int) -> [String] {
        [
            "global",
            "    nbthread 1",
            "    cpu-map 1/1 \(cpu)",
            "    maxconn 4000",
            "defaults",
            "    mode tcp",
            "    balance roundrobin",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
    }

    /// The HAProxy configuration the comparison uses: `mode tcp`, `balance roundrobin`, one
    /// thread on `cpu`, the same backends and timeouts as Berth's defaults.
    static func haproxyConfiguration(spliceAuto: Bool, webPort: UInt16, bulkPort: UInt16,
                                     web: [SocketAddress], bulk: SocketAddress, cpu: Int) -> String {
        var lines = haproxyPreamble(cpu: cpu)
        if spliceAuto { lines.append("    option splice-auto") }
        lines += [
            "frontend web",
            "    bind 127.0.0.1:\(webPort)",
            "    default_backend web",
            "frontend bulk",
            "    bind 127.0.0.1:\(bulkPort)",
            "    default_backend bulk",
            "backend web",
        ]
        for (index, address) in web.enumerated() { lines.append("    server web\(index) \(address)") }
        lines += ["backend bulk", "    server bulk0 \(bulk)"]
        return lines.joined(separator: "\n") + "\n"
    }

    /// HAProxy in the foreground (`-db`), pinned to `cpu` with taskset when it exists (and
    /// cpu-map in any case), its configuration and log in a mktemp directory. Ready once both
    /// ports accept a connection.
    static func startHAProxy(path: String, spliceAuto: Bool, web: [SocketAddress], bulk: SocketAddress, cpu: Int) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let webAddress = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let bulkAddress = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let configuration = try directory.write("haproxy.cfg", contents: haproxyConfiguration(
                spliceAuto: spliceAuto, webPort: webAddress.port, bulkPort: bulkAddress.port, web: web, bulk: bulk, cpu: cpu))
            return try startExternal(name: spliceAuto ? "haproxy-splice-auto" : "haproxy", path: path,
                                     arguments: ["-db", "-f", configuration], cpus: "\(cpu)", directory: directory,
                                     addresses: ["web": webAddress, "bulk": bulkAddress])
        } catch {
            directory.remove()
            throw error
        }
    }

    /// `path` under `taskset -c CPUS` when taskset exists (a child would otherwise inherit the
    /// bench's own pinning to the load CPU), its stdout and stderr in `logFile`.
    static func spawnOnCPUs(name: String, path: String, arguments: [String], cpus: String,
                            logFile: String) throws(BenchError) -> ChildProcess {
        let tasksetPaths: [String] = ["/usr/bin/taskset", "/bin/taskset"]
        guard let taskset = tasksetPaths.first(where: { access($0, X_OK) == 0 }) else {
            return try ChildProcess.spawn(name: name, path: path, arguments: arguments, logFile: logFile)
        }
        return try ChildProcess.spawn(name: name, path: taskset, arguments: ["-c", cpus, path] + arguments, logFile: logFile)
    }

    /// A program that does not watch its stdin (HAProxy, the berth binary), its stdout and
    /// stderr in `directory/NAME.log`, run under `taskset -c CPUS` when taskset exists (a child
    /// would otherwise inherit the bench's own pinning to the load CPU), with a watchdog role
    /// that stops it if the bench dies. Ready once every address of `addresses` is `reachable`
    /// (by default: accepts a connection from the bench) within `timeout` ms. The returned process owns `directory`; on failure the
    /// caller still does.
    static func startExternal(name: String, path: String, arguments: [String], cpus: String,
                              directory: TemporaryDirectory, addresses: [String: SocketAddress],
                              reachable: (SocketAddress) -> Bool = { canConnect(to: $0) },
                              timeout: Int64 = startTimeout) throws(BenchError) -> ServingProcess {
        let log = "\(directory.path)/\(name).log"
        let child = try spawnOnCPUs(name: name, path: path, arguments: arguments, cpus: cpus, logFile: log)
        let watchdog: ChildProcess
        do {
            watchdog = try ChildProcess.spawn(name: "\(name) watchdog", path: currentExecutablePath(), arguments: [
                "--role", "watchdog", "--pid", "\(child.pid)", "--remove", directory.path,
            ])
            _ = try watchdog.readLine(timeout: timeout)
        } catch {
            child.stop()
            throw error
        }
        let deadline = MonotonicClock.milliseconds() + timeout
        var ready = false
        while !ready && MonotonicClock.milliseconds() < deadline {
            if child.hasExited() { break }
            ready = addresses.values.allSatisfy { reachable($0) }
            if !ready { usleep(20_000) }
        }
        guard ready else {
            let output = ProcFS.read(log) ?? ""
            watchdog.stop()
            child.stop()
            throw BenchError.child("\(name) did not start: \(output.split(separator: "\n").suffix(3).joined(separator: " | "))")
        }
        return ServingProcess(child: child, addresses: addresses, directory: directory, watchdog: watchdog)
    }

    /// A port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed).
    static func freePort() throws(BenchError) -> UInt16 {
        do {
            var socket = try Sockets.listen(on: SocketAddress(ipv4: (127, 0, 0, 1), port: 0), reusePort: false)
            defer { socket.close() }
            return try Sockets.localAddress(socket.raw).port
        } catch {
            throw .system(error)
        }
    }

    /// Whether a TCP connect to `address` succeeds within 200 ms.
    static func canConnect(to address: SocketAddress) -> Bool {
        var connected = false
        guard var socket = try? Sockets.connect(to: address, connected: &connected) else { return false }
        defer { socket.close() }
        if connected { return true }
        var poller = pollfd(fd: socket.raw, events: Int16(POLLOUT), revents: 0)
        guard poll(&poller, 1, 200) == 1 else { return false }
        return Sockets.pendingError(socket.raw) == 0
    }
}
