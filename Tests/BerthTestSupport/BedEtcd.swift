// A real etcd (Debian's etcd-server) on one host of a NetworkTestBed: clients on
// http://<host address>:2379 and, inside that host only, http://127.0.0.1:2379 (so etcdctl on
// the etcd host still reaches it while the host's link is down or it is partitioned).
import Foundation
import Glibc

public final class BedEtcd: @unchecked Sendable {
    public let bed: NetworkTestBed
    /// The bed host etcd runs on.
    public let hostName: String
    /// `http://<address>:2379`: what the other hosts use.
    public let clientURL: String
    /// `http://127.0.0.1:2379`, valid inside the etcd host.
    public let localURL = "http://127.0.0.1:2379"
    public let dataDirectory: String
    private let lock = NSLock()
    private var process: SpawnedProcess?
    private var lastLog = ""
    private var removed = false

    /// Starts etcd on `host` with a new temporary data directory and waits until it is healthy.
    public init(bed: NetworkTestBed, host: String = "etcd") throws {
        guard access(EtcdFixture.etcdPath, X_OK) == 0, access(EtcdFixture.etcdctlPath, X_OK) == 0 else {
            throw FixtureFailure("\(EtcdFixture.etcdPath) or \(EtcdFixture.etcdctlPath) is missing: apt-get install etcd-server etcd-client")
        }
        self.bed = bed
        hostName = host
        clientURL = "http://\(bed.host(host).address):2379"
        var template = Array("/tmp/berth-bed-etcd-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw FixtureFailure("mkdtemp: \(String(cString: strerror(errno)))") }
        dataDirectory = String(cString: made)
        do {
            try start()
            try waitHealthy()
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// Starts etcd (again, on the same data) unless it runs.
    public func start() throws {
        try lock.withLock {
            guard !removed else { throw FixtureFailure("etcd was removed") }
            if process?.isRunning == true { return }
            let address = bed.host(hostName).address
            process = try bed.spawn(in: hostName, EtcdFixture.etcdPath, [
                "--name", "bed", "--data-dir", "\(dataDirectory)/data",
                "--listen-client-urls", "http://\(address):2379,\(localURL)",
                "--advertise-client-urls", "http://\(address):2379",
                "--listen-peer-urls", "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "bed=http://127.0.0.1:2380",
                "--initial-cluster-state", "new", "--logger", "zap", "--log-outputs", "stderr",
            ])
        }
    }

    /// Stops etcd by PID (SIGKILL when `hard`, else SIGTERM), keeping its data for start().
    public func stop(hard: Bool = false) {
        lock.withLock {
            guard let running = process else { return }
            process = nil
            lastLog = running.standardError
            if hard { running.signal(SIGKILL) }
            running.stop(grace: 5)
        }
    }

    /// Stops etcd and removes its data directory. Idempotent; deinit calls it.
    public func remove() {
        stop(hard: true)
        let first = lock.withLock { () -> Bool in
            defer { removed = true }
            return !removed
        }
        if first { _ = try? SpawnedProcess.run("rm", ["-rf", dataDirectory], timeout: 30) }
    }

    public var pid: pid_t? { lock.withLock { process?.isRunning == true ? process?.pid : nil } }

    /// The running etcd's log (stderr), or the last one's once stopped.
    public var log: String { lock.withLock { process?.standardError ?? lastLog } }

    /// Waits until `etcdctl endpoint health` passes inside the etcd host.
    public func waitHealthy(timeout: Double = 20) throws {
        let deadline = monotonicSeconds() + timeout
        var last = ""
        while monotonicSeconds() < deadline {
            do {
                try etcdctl(["endpoint", "health"])
                return
            } catch {
                last = "\(error)"
            }
            guard pid != nil else { break }
            usleep(100_000)
        }
        throw FixtureFailure("etcd on \(hostName) is not healthy after \(timeout) s: \(last)\nlog: \(log.suffix(2000))")
    }

    /// etcdctl (API v3) inside the etcd host against 127.0.0.1:2379; its stdout. Throws on a
    /// non-zero exit.
    @discardableResult
    public func etcdctl(_ arguments: [String], timeout: Double = 10) throws -> String {
        try bed.run(in: hostName, EtcdFixture.etcdctlPath, ["--endpoints", localURL, "--command-timeout=3s"] + arguments,
                    environment: ["ETCDCTL_API": "3"], timeout: timeout)
    }

    /// The keys under `prefix` (etcdctl get --prefix --keys-only).
    public func keys(prefix: String) throws -> [String] {
        try etcdctl(["get", "--prefix", "--keys-only", prefix]).split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }
}
