// A real dockerd for tests, isolated from any other Docker on the machine.
//
// What works on this machine (Debian 12 docker.io 20.10, as root): dockerd with its own
// --data-root, --exec-root (its managed containerd lives there too), --pidfile and unix socket,
// on a bridge of its own (`-b`, created here with a random name and a random 10.x/24 so two
// fixtures can run at once), with --iptables=false --ip-masq=false --ip-forward=false: no rule of
// the host is touched. Ports are published by Docker's userland proxy (docker-proxy), so
// `-p 127.0.0.1:0:8000` gives a port on loopback that reaches the container; tests never dial
// a container's bridge address. `--bridge=none` cannot publish ports at all.
// The test image is `docker import` of a rootfs holding only Debian's static busybox.
import Foundation
import Glibc

public final class DockerFixture: @unchecked Sendable {
    /// `unix:///…/docker.sock`, for `DOCKER_HOST`.
    public let host: String
    public let directory: String
    public let bridge: String
    /// The test image: a whoami-like HTTP server on 8000 and 8001 answering `I'm <hostname>`,
    /// stopping 0.3 s after SIGTERM (a server's graceful shutdown). On 8000 the whole answer
    /// leaves in one write, as from jwilder/whoami (Go's net/http buffers a small response):
    /// busybox nc runs a script per connection that reads the request and `cat`s the answer
    /// (one sendfile). On 8001, busybox httpd (headers and body in two writes).
    public static let image = "berth-test/whoami:latest"
    private var daemon: SpawnedProcess?
    private var removed = false

    /// Skips (throws `FixtureFailure`) unless root and dockerd, docker, busybox are installed.
    public static func available() -> String? {
        if getuid() != 0 { return "dockerd needs root" }
        for tool in ["/usr/sbin/dockerd", "/bin/busybox"] where access(tool, X_OK) != 0 { return "\(tool) is not installed" }
        if which("docker") == nil { return "the docker client is not installed" }
        return nil
    }

    public init() throws {
        if let reason = Self.available() { throw FixtureFailure(reason) }
        var template = Array("/tmp/berth-dockerd-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw FixtureFailure("mkdtemp: \(String(cString: strerror(errno)))") }
        directory = String(cString: made)
        host = "unix://\(directory)/docker.sock"
        bridge = "brth" + String(UInt32.random(in: 0..<0xffffff), radix: 16)
        let subnet = "10.\(Int.random(in: 200...250)).\(Int.random(in: 0...255))"
        _ = try SpawnedProcess.run("ip", ["link", "add", bridge, "type", "bridge"], timeout: 10)
        _ = try SpawnedProcess.run("ip", ["addr", "add", "\(subnet).1/24", "dev", bridge], timeout: 10)
        _ = try SpawnedProcess.run("ip", ["link", "set", bridge, "up"], timeout: 10)
        do {
            try startDaemon()
            try buildImage()
        } catch {
            stop()
            throw error
        }
    }

    deinit { stop() }

    private func startDaemon() throws {
        let process = try SpawnedProcess("/usr/sbin/dockerd", [
            "--data-root", "\(directory)/data", "--exec-root", "\(directory)/exec",
            "--pidfile", "\(directory)/docker.pid", "-H", host, "-b", bridge,
            "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--userland-proxy=true",
            "--log-level=warn",
        ])
        daemon = process
        let ready = waitUntil(timeout: 60, interval: 0.1) {
            guard process.isRunning else { return true }
            return (try? docker(["version", "--format", "{{.Server.Version}}"], timeout: 5).code) == 0
        }
        guard ready != nil, process.isRunning else {
            throw FixtureFailure("dockerd did not start: \(process.standardError.suffix(2000))")
        }
    }

    /// Stops dockerd (SIGTERM by PID; its containers stop with it) and starts it again on the
    /// same data, socket and bridge.
    public func restartDaemon() throws {
        daemon?.stop(grace: 30)
        daemon = nil
        try startDaemon()
    }

    /// Runs the docker client against this daemon.
    @discardableResult
    public func docker(_ arguments: [String], timeout: Double = 60) throws -> (code: CInt, output: String, error: String) {
        try SpawnedProcess.run("docker", ["-H", host] + arguments, timeout: timeout)
    }

    /// `docker run -d` of the test image; its full id. Ports are published on 127.0.0.1 only.
    public func run(name: String? = nil, publish: [Int] = [8000], labels: [String: String] = [:],
                    environment: [String: String] = [:], options: [String] = []) throws -> String {
        var arguments = ["run", "-d"] + options
        if let name { arguments += ["--name", name] }
        for port in publish { arguments += ["-p", "127.0.0.1:0:\(port)"] }
        for (key, value) in labels.sorted(by: { $0.key < $1.key }) { arguments += ["--label", "\(key)=\(value)"] }
        for (key, value) in environment.sorted(by: { $0.key < $1.key }) { arguments += ["-e", "\(key)=\(value)"] }
        arguments.append(Self.image)
        let result = try docker(arguments)
        let id = result.output.trimmingCharacters(in: .whitespacesAndNewlines)
        guard result.code == 0, id.count == 64 else { throw FixtureFailure("docker run: \(result.error)") }
        return id
    }

    /// The host port published for `port`/tcp on 127.0.0.1.
    public func publishedPort(_ id: String, _ port: Int = 8000) throws -> Int {
        let result = try docker(["port", id, "\(port)/tcp"])
        guard let line = result.output.split(separator: "\n").first(where: { $0.hasPrefix("127.0.0.1:") }),
              let value = Int(line.split(separator: ":").last ?? "") else {
            throw FixtureFailure("docker port \(id.prefix(12)) \(port): \(result.output) \(result.error)")
        }
        return value
    }

    private func buildImage() throws {
        let root = "\(directory)/rootfs"
        for folder in ["", "/bin", "/www", "/tmp", "/etc"] { mkdir(root + folder, 0o755) }
        _ = try SpawnedProcess.run("cp", ["/bin/busybox", "\(root)/bin/busybox"], timeout: 10)
        for tool in ["sh", "httpd", "nc", "hostname", "sleep", "echo", "printf", "cat", "test", "touch", "rm"] {
            symlink("busybox", "\(root)/bin/\(tool)")
        }
        // One connection of the server on 8000: the request's lines up to the blank one, then
        // the prepared answer. (A SIGKILL between two writes would cut an answer after its
        // headers, which no proxy can repair; a real whoami sends it whole.)
        let serve = """
            #!/bin/sh
            while read -r line; do [ "${line%$'\\r'}" = "" ] && break; done
            exec cat /www/answer
            """
        guard FileManager.default.createFile(atPath: "\(root)/serve.sh", contents: Data(serve.utf8),
                                             attributes: [.posixPermissions: 0o755]) else {
            throw FixtureFailure("cannot write \(root)/serve.sh")
        }
        // PID 1 is this script: it answers SIGTERM (a shell as PID 1 would ignore it) as a server
        // with a short graceful shutdown does: still serving for 0.3 s, then gone. That grace is
        // what the registrar's draining mark on `stop` is for: proxies stop sending new
        // connections before the process dies. (SIGKILL, `docker kill`, allows none.)
        let script = """
            echo "I'm $(hostname)" > /www/index.html
            body="I'm $(hostname)"
            printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s\\n' \\
                $(( ${#body} + 1 )) "$body" > /www/answer
            trap 'sleep 0.3; exit 0' TERM
            httpd -p 8001 -h /www
            nc -ll -p 8000 -e /serve.sh &
            wait
            """
        guard FileManager.default.createFile(atPath: "\(root)/start.sh", contents: Data(script.utf8)) else {
            throw FixtureFailure("cannot write \(root)/start.sh")
        }
        let tar = "tar -C \(root) -c . | docker -H \(host) import -c 'CMD [\"/bin/sh\",\"/start.sh\"]' - \(Self.image)"
        let result = try SpawnedProcess.run("sh", ["-c", tar], timeout: 60)
        guard result.code == 0 else { throw FixtureFailure("docker import: \(result.error)") }
    }

    /// Removes every container, stops dockerd by PID, deletes the bridge and the directory.
    public func stop() {
        guard !removed else { return }
        removed = true
        if let daemon, daemon.isRunning {
            if let ids = try? docker(["ps", "-aq"], timeout: 30).output.split(separator: "\n").map(String.init), !ids.isEmpty {
                _ = try? docker(["rm", "-f"] + ids, timeout: 60)
            }
            daemon.stop(grace: 30)
        }
        daemon = nil
        _ = try? SpawnedProcess.run("ip", ["link", "del", bridge], timeout: 10)
        // Overlay mounts are gone once dockerd stopped cleanly; whatever is left is unmounted first.
        _ = try? SpawnedProcess.run("sh", ["-c", "grep -o ' \(directory)[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l"], timeout: 20)
        _ = try? SpawnedProcess.run("rm", ["-rf", directory], timeout: 60)
    }

    private static func which(_ tool: String) -> String? {
        for folder in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let path = "\(folder)/\(tool)"
            if access(path, X_OK) == 0 { return path }
        }
        return nil
    }
}
