import BerthSystem
import BerthTestSupport
import Glibc

/// One row of the hosts table: one fault, one proxy.
struct HostsRow {
    var fault: String
    var proxy: String
    var requests = 0
    var failed = 0
    /// Requests slower than 1 s (failed ones included).
    var slow = 0
    var p50 = 0.0
    var p99 = 0.0
    var maximum = 0.0
    /// What the row measured besides the traffic ("down after 1.3 s", ...).
    var detail = ""
}

struct HostsResult {
    var skipped: String?
    var rows: [HostsRow] = []
    var failures: [String] = []
}

/// `bench --scenarios hosts`: the failure matrix on hosts in network namespaces (etcd, client,
/// a, b; two whoami on each of a and b, registered by `berth register --static` per host), with
/// `berth discover` and HAProxy side by side in the client host, the same checks and retries,
/// each under a sequential client (a new connection per request, 5 s limit), through one fault
/// after the other. Both proxies see every fault at the same moment.
struct HostsScenario {
    let options: BenchOptions
    let berth: String
    let haproxy: String?

    static let haproxyPort = 8100
    /// The settings both proxies run with (HAProxy's names in `HAProxyBed.configuration`).
    static let berthFlags = ["--retries", "3", "--drain-timeout", "1s"]

    func run() -> HostsResult {
        var result = HostsResult()
        if let reason = NetworkTestBed.unavailableReason() {
            result.skipped = reason
            progress("hosts: skipped: \(reason)")
            return result
        }
        guard access(EtcdFixture.etcdPath, X_OK) == 0 else {
            result.skipped = "etcd is not installed (etcd-server)"
            return result
        }
        do {
            try measure(into: &result)
        } catch {
            result.failures.append("\(error)")
            progress("hosts: \(error)")
        }
        return result
    }

    private func measure(into result: inout HostsResult) throws {
        progress("hosts: making the hosts")
        let scene = try Scene(berth: berth)
        defer { scene.remove() }
        try scene.startBackends(Scene.Options(spares: true))
        let b = scene.bed.host("b").address
        let silent = try scene.bed.withNetwork(of: "b") { try SilentListener(host: b, port: 8009) }
        defer { silent.stop() }
        try scene.startDiscover(checkTimeout: "1s", extra: Self.berthFlags)
        var haproxyBed: HAProxyBed?
        if let haproxy {
            haproxyBed = try HAProxyBed(scene: scene, binary: haproxy, port: Self.haproxyPort,
                                        backends: ["a1", "a2", "b1", "b2"].map { ($0, scene.backends[$0]!) } + [("silent", "\(b):8009")])
        } else {
            result.failures.append("haproxy is not installed: Berth's rows only")
        }
        defer { haproxyBed?.stop() }
        try scene.waitForAnswers(from: ["a1", "a2", "b1", "b2"])
        let berthLoad = RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Scene.listenPort)
        let haproxyLoad = haproxyBed.map { _ in RequestLoad(bed: scene.bed, host: "client", address: scene.clientAddress, port: Self.haproxyPort) }
        defer {
            berthLoad.stop()
            haproxyLoad?.stop()
        }
        let run = HostsRun(scene: scene, haproxy: haproxyBed, berthLoad: berthLoad, haproxyLoad: haproxyLoad,
                           quick: options.quick, silentAddress: "\(b):8009")
        sleepSeconds(1)
        for fault in HostsRun.Fault.allCases {
            progress("hosts: \(fault.rawValue)")
            result.rows += try run.measure(fault)
        }
    }
}

/// HAProxy in the client host with the failure matrix's settings, and its admin socket.
final class HAProxyBed {
    let directory: TemporaryDirectory
    let process: SpawnedProcess
    let socketPath: String

    init(scene: Scene, binary: String, port: Int, backends: [(name: String, address: String)]) throws {
        directory = try TemporaryDirectory(prefix: "berth-hosts")
        socketPath = "\(directory.path)/admin.sock"
        let servers = backends.map { "    server \($0.name) \($0.address)\($0.name == "silent" ? " disabled" : "")" }
        // The same checks (inter 500 ms, fall 2, rise 2, timeout 1 s), connect timeout, passive
        // ejection (observe layer4, one error: --observe-errors 1) and retries with redispatch
        // as berth discover's flags. retry-on is HTTP-mode only in HAProxy: in TCP mode it has
        // no equivalent of --retry-on empty-response,response-timeout.
        let configuration = """
            global
                maxconn 4000
                stats socket \(socketPath) level admin
            defaults
                mode tcp
                timeout connect 1s
                timeout client 60s
                timeout server 60s
                timeout check 1s
                retries 3
                option redispatch
            listen whoami
                bind \(scene.clientAddress):\(port)
                balance roundrobin
                default-server check inter 500 fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
            \(servers.joined(separator: "\n"))

            """
        let file = "\(directory.path)/haproxy.cfg"
        let directory = self.directory
        do {
            guard let handle = fopen(file, "w") else { throw FixtureFailure("cannot write \(file)") }
            fputs(configuration, handle)
            fclose(handle)
            process = try scene.bed.spawn(in: "client", binary, ["-f", file, "-db"])
        } catch {
            directory.remove()
            throw error
        }
        let ready = waitUntil(timeout: 10, interval: 0.05) { !self.process.isRunning || (try? self.command("show info")) != nil }
        guard ready != nil, process.isRunning else {
            let output = process.standardError.suffix(1000)
            stop()
            throw FixtureFailure("haproxy did not start: \(output)")
        }
    }

    /// One command on the admin socket; its answer.
    func command(_ line: String) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw FixtureFailure("socket: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in socketPath.utf8.prefix(raw.count - 1).enumerated() { raw[index] = byte }
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw FixtureFailure("connect \(socketPath): \(String(cString: strerror(errno)))") }
        var timeout = timeval(tv_sec: 3, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let bytes = Array((line + "\n").utf8)
        _ = send(fd, bytes, bytes.count, Int32(MSG_NOSIGNAL))
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while answer.count < 1 << 20 {
            let got = recv(fd, &buffer, buffer.count, 0)
            if got <= 0 { break }
            answer += buffer[0..<got]
        }
        return String(decoding: answer, as: UTF8.self)
    }

    /// Server name → status (UP, DOWN, MAINT, ...) from `show stat`.
    func statuses() -> [String: String] {
        guard let csv = try? command("show stat") else { return [:] }
        let rows = csv.split(separator: "\n").map { $0.split(separator: ",", omittingEmptySubsequences: false).map(String.init) }
        guard let header = rows.first, let name = header.firstIndex(of: "svname"), let status = header.firstIndex(of: "status") else {
            return [:]
        }
        var result: [String: String] = [:]
        for row in rows.dropFirst() where row.count > status && row[0] == "whoami" && !["FRONTEND", "BACKEND"].contains(row[name]) {
            result[row[name]] = row[status].split(separator: " ").first.map(String.init) ?? row[status]
        }
        return result
    }

    func stop() {
        process.stop()
        directory.remove()
    }
}

func sleepSeconds(_ seconds: Double) {
    usleep(useconds_t(max(0, seconds) * 1e6))
}
