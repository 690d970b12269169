import BerthEngine
import BerthSystem
import Glibc

/// Starting the scenarios' proxies: the `berth` binary (its `proxy` command, which builds the
/// engine through `HealthRouter.make`: the bench target itself does not link BerthHealth) and
/// HAProxy with health checks.
extension Launcher {
    /// Bounds of the walk over the package's Sources/ (`staleness`).
    private static let sourceWalkDepth = 6
    private static let sourceWalkEntries = 5_000

    /// `berth` beside this executable (`swift build` puts both products in one directory).
    static func defaultBerthPath() -> String {
        let own = currentExecutablePath()
        guard let slash = own.lastIndex(of: "/") else { return "berth" }
        return String(own[..<slash]) + "/berth"
    }

    /// The berth binary: `explicit`, else the default one, if executable.
    static func locateBerth(_ explicit: String?) -> String? {
        let path = explicit ?? defaultBerthPath()
        return access(path, X_OK) == 0 ? path : nil
    }

    /// A reason to think `berth` was built before the sources last changed (`swift run bench`
    /// builds only the bench): a file under the package's Sources/ modified after the binary.
    /// Nil when it looks current, or when this bench does not run from a package's .build.
    static func staleness(ofBerth path: String) -> String? {
        let own = currentExecutablePath()
        guard let built = modificationTime(path), let marker = own.firstRange(of: "/.build/") else { return nil }
        let sources = String(own[..<marker.lowerBound]) + "/Sources"
        var newest: (time: Int, path: String)?
        var pending = [(sources, 0)]
        var visited = 0
        while let (directory, depth) = pending.popLast(), visited < sourceWalkEntries {
            guard let handle = opendir(directory) else { continue }
            while visited < sourceWalkEntries, let entry = readdir(handle) {
                visited += 1
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard !name.hasPrefix(".") else { continue }
                let child = "\(directory)/\(name)"
                if entry.pointee.d_type == UInt8(DT_DIR) {
                    if depth < sourceWalkDepth { pending.append((child, depth + 1)) }
                } else if let time = modificationTime(child), time > (newest?.time ?? Int.min) {
                    newest = (time, child)
                }
            }
            closedir(handle)
        }
        guard let newest, newest.time > built else { return nil }
        return "\(newest.path) changed after \(path) was built"
    }

    private static func modificationTime(_ path: String) -> Int? {
        FileStatus.modificationTime(path)
    }

    /// `berth proxy` on a free port of 127.0.0.1: one frontend `name` round-robin over
    /// `backends`, one worker, the relay mode of the engine's default, plus `flags`. Addressed
    /// as `name`. The whole process runs on `cpu` (taskset, and `--cpus` for the worker), its
    /// checker thread included, as HAProxy's checks run in its one thread on that CPU.
    static func startBerthBinary(name: String, path: String, backends: [SocketAddress], cpu: Int,
                                 flags: [String], weights: [Int]? = nil) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let address = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let arguments = [
                "proxy", "--listen", address.description, "--name", name,
                "--backend", backends.enumerated().map { index, backend in
                    weights.map { weightedBackend(backend, weight: $0[index % $0.count]) } ?? backend.description
                }.joined(separator: ","),
                "--workers", "1", "--cpus", "\(cpu)", "--relay", EngineConfiguration().relay.rawValue, "--drain-timeout", "1s",
            ] + flags
            return try startExternal(name: name, path: path, arguments: arguments, cpus: "\(cpu)", directory: directory,
                                     addresses: [name: address])
        } catch {
            directory.remove()
            throw error
        }
    }

    /// A `--backend` item with a weight, as `berth proxy` writes it.
    static func weightedBackend(_ address: SocketAddress, weight: Int) -> String {
        "\(address)*\(weight)"
    }

    /// HAProxy for the failover scenario: the settings Berth's row uses, in HAProxy's words.
    static func haproxyFailoverConfiguration(port: UInt16, backends: [SocketAddress], cpu: Int) -> String {
        var lines = haproxyPreamble(cpu: cpu) + [
            "    timeout check \(FailoverScenario.checkInterval)ms",
            "    retries \(FailoverScenario.retries)",
            "    option redispatch",
            "frontend failover",
            "    bind 127.0.0.1:\(port)",
            "    default_backend failover",
            "backend failover",
            "    option httpchk GET /",
            "    default-server check inter \(FailoverScenario.checkInterval)ms rise \(FailoverScenario.rise) "
                + "fall \(FailoverScenario.fall) observe layer4 error-limit \(FailoverScenario.observeErrors) on-error mark-down",
        ]
        for (index, address) in backends.enumerated() { lines.append("    server app\(index) \(address)") }
        return lines.joined(separator: "\n") + "\n"
    }

    /// HAProxy with `haproxyFailoverConfiguration`, pinned to `cpu`; addressed as `failover`.
    static func startHAProxyFailover(path: String, backends: [SocketAddress], cpu: Int) throws(BenchError) -> ServingProcess {
        let directory = try TemporaryDirectory(prefix: "berth-bench")
        do throws(BenchError) {
            let address = SocketAddress(ipv4: (127, 0, 0, 1), port: try freePort())
            let configuration = try directory.write("haproxy-failover.cfg", contents: haproxyFailoverConfiguration(
                port: address.port, backends: backends, cpu: cpu))
            return try startExternal(name: "haproxy-failover", path: path, arguments: ["-db", "-f", configuration],
                                     cpus: "\(cpu)", directory: directory, addresses: ["failover": address])
        } catch {
            directory.remove()
            throw error
        }
    }

    /// Whether a `GET /` through `address` is answered `200` within `timeout` ms (tries every
    /// 50 ms: a proxy whose backends start down rejects clients until a check brings one up).
    static func awaitAnswer(from address: SocketAddress, timeout: Int64) -> Bool {
        let deadline = MonotonicClock.milliseconds() + timeout
        for _ in 0..<1_000 where MonotonicClock.milliseconds() < deadline {
            if answers200(address) { return true }
            usleep(50_000)
        }
        return false
    }

    /// One `GET /` with `Connection: close`, each step given at most 500 ms.
    private static func answers200(_ address: SocketAddress) -> Bool {
        fetch(from: address, stepTimeout: 500)?.starts(with: Array("HTTP/1.1 200".utf8)) ?? false
    }

    /// One `GET /` with `Connection: close`: the response as read until the server closed (at
    /// most 16 KiB), or nil when the connect, the send or a read failed or took more than
    /// `stepTimeout` ms.
    static func fetch(from address: SocketAddress, path: String = "/", stepTimeout: CInt, limit: Int = 16_384) -> [UInt8]? {
        var connected = false
        guard var socket = try? Sockets.connect(to: address, connected: &connected) else { return nil }
        defer { socket.close() }
        var poller = pollfd(fd: socket.raw, events: Int16(POLLOUT), revents: 0)
        guard connected || (poll(&poller, 1, stepTimeout) == 1 && Sockets.pendingError(socket.raw) == 0) else { return nil }
        var request = Array("GET \(path) HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".utf8)
        let written = request.withUnsafeMutableBytes { Glibc.send(socket.raw, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard written == request.count else { return nil }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16_384)
        for _ in 0..<(limit / 1_024 + 16) where response.count < limit {
            poller = pollfd(fd: socket.raw, events: Int16(POLLIN), revents: 0)
            guard poll(&poller, 1, stepTimeout) == 1 else { return nil }
            let count = buffer.withUnsafeMutableBytes { Glibc.read(socket.raw, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            response += buffer[0..<count]
        }
        return response
    }

    /// The name in a whoami answer (`200` with the body `I'm NAME`), or nil.
    static func whoamiName(_ response: [UInt8]) -> String? {
        let separator: [UInt8] = [13, 10, 13, 10]
        guard response.starts(with: Array("HTTP/1.1 200".utf8)),
              let headEnd = response.indices.dropLast(3).first(where: { response[$0..<$0 + 4].elementsEqual(separator) }) else {
            return nil
        }
        let body = response[(headEnd + 4)...]
        guard body.starts(with: Array("I'm ".utf8)) else { return nil }
        return String(decoding: body.dropFirst(4).prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)
    }
}
