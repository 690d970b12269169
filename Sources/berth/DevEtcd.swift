import BerthSystem
import BerthEtcd
import FoundationEssentials
import Glibc

/// An etcd started by `berth dev` as a child: a temporary data directory, free loopback ports,
/// stopped by its PID and the directory removed by `stop()`.
final class DevEtcd: @unchecked Sendable {
    let clientURL: String
    let directory: String
    private var process: SpawnedChild?

    /// Starts `binary` and waits (up to 20 s) until it answers a request.
    init(binary: String) throws {
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            throw ValidationErrorText("\(binary) is missing: apt-get install etcd-server (or pass --etcd-binary)")
        }
        // Ports first: nothing to clean up if they fail.
        let clientPort = try Self.freePort(), peerPort = try Self.freePort()
        var template = Array("/tmp/berth-dev.XXXXXX".utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw ValidationErrorText("mkdtemp: errno \(errno)")
        }
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        clientURL = "http://127.0.0.1:\(clientPort)"
        let peerURL = "http://127.0.0.1:\(peerPort)"
        let arguments = [
            "--name", "berth-dev", "--data-dir", "\(directory)/data",
            "--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
            "--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
            "--initial-cluster", "berth-dev=\(peerURL)", "--logger", "zap", "--log-outputs", "\(directory)/etcd.log",
        ]
        do {
            process = try SpawnedChild(binary, arguments)
            try waitUntilServing()
        } catch {
            stop()
            throw error
        }
    }

    private func waitUntilServing() throws {
        var configuration = EtcdConfiguration(endpoints: [try EtcdEndpoint.parse(clientURL)])
        configuration.requestTimeout = .seconds(1)
        let client = try EtcdClient(configuration: configuration)
        defer { client.close() }
        let deadline = MonotonicClock.milliseconds() + 20_000
        while MonotonicClock.milliseconds() < deadline {
            if let process, let status = process.exitStatus() {
                throw ValidationErrorText("etcd exited at start-up (\(status)); see \(directory)/etcd.log")
            }
            let answered = (try? blockingAwait { () async throws -> Bool in
                _ = try await client.get(key: "/")
                return true
            }) ?? false
            if answered { return }
            usleep(100_000)
        }
        throw ValidationErrorText("etcd did not answer within 20 s; see \(directory)/etcd.log")
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s) and removes its directory.
    func stop() {
        process?.stop(grace: 5_000)
        process = nil
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// A loopback port free a moment ago.
    static func freePort() throws -> Int {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        defer { socket.close() }
        return Int(try Sockets.localAddress(socket.raw).port)
    }
}

/// A child process with stdin, stdout and stderr on /dev/null (posix_spawn), stopped by its PID.
/// (Foundation's `Process` would do, but Foundation stays out of the binary: see the README's
/// container section.)
struct SpawnedChild {
    let pid: pid_t

    init(_ path: String, _ arguments: [String]) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for fd: CInt in [0, 1, 2] {
            posix_spawn_file_actions_addopen(&actions, fd, "/dev/null", fd == 0 ? O_RDONLY : O_WRONLY, 0)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        // The child starts with no signal blocked and every handler at its default: berth
        // blocks SIGTERM and SIGINT (they are waited for) and ignores SIGPIPE, and exec would
        // pass both on.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        var defaults = sigset_t()
        sigfillset(&defaults)
        sigdelset(&defaults, SIGKILL)
        sigdelset(&defaults, SIGSTOP)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, &actions, &attributes, argv, environ)
        guard result == 0 else { throw ValidationErrorText("cannot start \(path): \(String(cString: strerror(result)))") }
        self.pid = pid
    }

    /// How the child ended ("status N", "signal N") once it has (it is reaped then), else nil.
    func exitStatus() -> String? {
        var status: CInt = 0
        guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
        return status & 0x7f == 0 ? "status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)"
    }

    /// SIGTERM, then SIGKILL after `grace` ms; reaps it.
    func stop(grace: Int64) {
        var status: CInt = 0
        guard waitpid(pid, &status, WNOHANG) == 0 else { return }
        kill(pid, SIGTERM)
        let deadline = MonotonicClock.milliseconds() + grace
        while MonotonicClock.milliseconds() < deadline {
            if waitpid(pid, &status, WNOHANG) != 0 { return }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        _ = waitpid(pid, &status, 0)
    }
}

/// A runtime failure of a command, shown as one line.
struct ValidationErrorText: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
