// The failure matrix's world, on a NetworkTestBed: hosts etcd, client, a and b. Hosts a and b
// each run two `berth whoami` (a1, a2 on a; b1, b2 on b; ports 8001 and 8002), registered as
// the service `whoami` (listen port 8000) by one `berth register --static … --ttl 3s` per host.
// The client host runs `berth discover` (started by each test, with its flags), whose stats are
// read from /stats.json. Every process is spawned in the bed and killed by PID when it goes.
import Foundation
import Glibc

public final class Scene {
    public struct Options {
        /// a2 is a SilentListener (accepts, never answers) instead of a whoami.
        public var silentA2 = false
        /// b3 and b4: whoami on b (8003, 8004) that b's registrar does not register; the test
        /// writes their keys with etcdctl.
        public var spares = false

        public init(silentA2: Bool = false, spares: Bool = false) {
            self.silentA2 = silentA2
            self.spares = spares
        }
    }

    public static let service = "whoami"
    public static let prefix = "/backends/whoami/"
    public static let listenPort = 8000
    public static let statsPort = 1936
    public static let ttl = 3.0

    public let bed: NetworkTestBed
    public let etcd: BedEtcd
    public var clientAddress: String { bed.host("client").address }
    /// Instance name (a1, b2, …) → HOST:PORT.
    public private(set) var backends: [String: String] = [:]
    public private(set) var silent: SilentListener?
    private var processes: [(label: String, process: SpawnedProcess)] = []

    /// The berth executable every process of the scene runs.
    public let berth: String

    public init(berth: String = BerthBinary.path) throws {
        self.berth = berth
        bed = try NetworkTestBed(hosts: ["etcd", "client", "a", "b"])
        do {
            etcd = try BedEtcd(bed: bed)
        } catch {
            bed.remove()
            throw error
        }
    }

    /// Starts the backends and the registrars; returns once every registered key is in etcd.
    public func startBackends(_ options: Options) throws {
        for host in ["a", "b"] {
            let address = bed.host(host).address
            var registered: [String] = []
            for index in 1...(host == "b" && options.spares ? 4 : 2) {
                let name = "\(host)\(index)", port = 8000 + index
                backends[name] = "\(address):\(port)"
                if index <= 2 { registered.append("\(Self.service)=\(address):\(port)@\(Self.listenPort)") }
                if name == "a2" && options.silentA2 {
                    silent = try bed.withNetwork(of: host) { try SilentListener(host: address, port: port) }
                } else {
                    processes.append((name, try bed.spawn(in: host, berth, [
                        "whoami", "--listen", "\(address):\(port)", "--id", name, "--threads", "1",
                    ])))
                }
            }
            processes.append(("register-\(host)", try bed.spawn(in: host, berth, [
                "register", "--etcd", etcd.clientURL, "--static", registered.joined(separator: ","),
                "--ttl", "\(Int(Self.ttl))s", "--no-docker",
            ])))
        }
        let expected = Set(["a1", "a2", "b1", "b2"].map { Self.prefix + backends[$0]! })
        var keys: Set<String> = []
        let registered = waitUntil(timeout: 15, interval: 0.1) {
            keys = Set((try? etcd.keys(prefix: Self.prefix)) ?? [])
            return expected.isSubset(of: keys)
        }
        if registered == nil { throw FixtureFailure("registrars did not register \(expected.sorted()); etcd has \(keys.sorted())\n\(logs())") }
    }

    /// Starts `berth discover` on the client host with the matrix's flags: tcp checks every
    /// 500 ms (timeout `checkTimeout`), rise 2, fall 2, observe-errors 1, connect timeout 1 s,
    /// `retry` (by default empty-response and response-timeout with a 1 s first-byte timeout).
    /// Returns once routing serves every name in `ready`.
    @discardableResult
    public func startDiscover(label: String = "discover", bind: String? = nil, statsPort: Int = statsPort,
                       checkTimeout: String = "300ms",
                       retry: [String] = ["--retry-on", "empty-response,response-timeout", "--first-byte-timeout", "1s"],
                       extra: [String] = [], ready: [String] = ["a1", "a2", "b1", "b2"]) throws -> SpawnedProcess {
        let bind = bind ?? clientAddress
        let process = try bed.spawn(in: "client", berth, [
            "discover", "--etcd", etcd.clientURL, "--bind", bind,
            "--check", "tcp", "--check-interval", "500ms", "--check-timeout", checkTimeout, "--rise", "2", "--fall", "2",
            "--observe-errors", "1", "--connect-timeout", "1s", "--stats", "\(bind):\(statsPort)",
        ] + retry + extra)
        processes.append((label, process))
        let addresses = Set(ready.map { backends[$0]! })
        var last = "no answer"
        let up = waitUntil(timeout: 20, interval: 0.1) {
            guard process.isRunning else { return true }
            guard let stats = try? stats(bind, statsPort) else { return false }
            last = stats.summary(names: names)
            return addresses.isSubset(of: Set(stats.backends.filter { $0.status == "UP" }.map(\.address)))
        }
        guard up != nil, process.isRunning else {
            throw FixtureFailure("\(label) did not route to \(ready.sorted()): \(last)\n\(logs())")
        }
        return process
    }

    /// Instance address → name.
    public var names: [String: String] { Dictionary(uniqueKeysWithValues: backends.map { ($0.value, $0.key) }) }

    /// The service's stats from a berth stats server on the client host.
    public func stats(_ address: String? = nil, _ port: Int = statsPort) throws -> StatsView {
        let body = try bed.withNetwork(of: "client") { try BedHTTP.body(address ?? clientAddress, port, path: "/stats.json") }
        return try StatsView(json: body)
    }

    /// Makes requests from the client host until every name in `names` answered (20 s at most).
    public func waitForAnswers(from names: Set<String>, address: String? = nil) throws {
        var seen: Set<String> = []
        let done = try bed.withNetwork(of: "client") {
            waitUntil(timeout: 20, interval: 0.02) {
                if let answer = try? BedHTTP.get(address ?? clientAddress, Self.listenPort, timeout: 3) { seen.insert(answer) }
                return names.isSubset(of: seen)
            }
        }
        if done == nil { throw FixtureFailure("only \(seen.sorted()) answered, expected \(names.sorted())\n\(logs())") }
    }

    /// Writes an instance's key with etcdctl on the etcd host (no lease: it stays until deleted).
    public func putInstance(_ name: String) throws {
        let address = backends[name]!
        let host = address.split(separator: ":")[0], port = address.split(separator: ":")[1]
        try etcd.etcdctl(["put", Self.prefix + address, "{\"host\":\"\(host)\",\"port\":\(port),\"listen\":\(Self.listenPort)}"])
    }

    public func deleteInstance(_ name: String) throws {
        try etcd.etcdctl(["del", Self.prefix + backends[name]!])
    }

    /// The tail of every process' stderr, for a failed test's log.
    public func logs(tail: Int = 3000) -> String {
        var text = ""
        for (label, process) in processes {
            let state = process.exitCode.map { "exit \($0)" } ?? "running"
            text += "--- \(label) (pid \(process.pid), \(state)):\n\(process.standardError.suffix(tail))\n"
        }
        return text + "--- etcd:\n\(etcd.log.suffix(tail))\n"
    }

    /// Stops everything (listener, processes, etcd and its data, the namespaces).
    public func remove() {
        silent?.stop()
        bed.remove()
        etcd.remove()
    }
}

/// The parts of /stats.json the matrix reads: the `whoami` service's rows.
public struct StatsView {
    public struct Backend {
        public let name: String
        public let address: String
        public let status: String
        public let checkCode: String?
        public let checkDetail: String?
        public let checkMilliseconds: Int?
        public let totalSessions: Int
        public let timeouts: Int
    }

    public let backends: [Backend]
    public let frontendTimeouts: Int
    public let totalTimeouts: Int
    /// discovery.connected: the etcd watch is established.
    public let connected: Bool?

    public init(json: String) throws {
        guard let root = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw FixtureFailure("stats.json is not an object")
        }
        connected = (root["discovery"] as? [String: Any])?["connected"] as? Bool
        let services = root["services"] as? [[String: Any]] ?? []
        let service = services.first { $0["name"] as? String == Scene.service } ?? [:]
        frontendTimeouts = (service["frontend"] as? [String: Any])?["timeouts"] as? Int ?? 0
        totalTimeouts = (service["totals"] as? [String: Any])?["timeouts"] as? Int ?? 0
        backends = (service["backends"] as? [[String: Any]] ?? []).map { row in
            let check = row["check"] as? [String: Any]
            let traffic = row["traffic"] as? [String: Any]
            return Backend(name: row["name"] as? String ?? "", address: row["address"] as? String ?? "",
                           status: row["status"] as? String ?? "", checkCode: check?["code"] as? String,
                           checkDetail: check?["detail"] as? String, checkMilliseconds: check?["durationMilliseconds"] as? Int,
                           totalSessions: traffic?["totalSessions"] as? Int ?? 0, timeouts: traffic?["timeouts"] as? Int ?? 0)
        }
    }

    public func backend(_ address: String) -> Backend? { backends.first { $0.address == address } }

    /// "a1 UP L4OK 1 ms, …" with instance names for addresses.
    public func summary(names: [String: String]) -> String {
        backends.map { row in
            "\(names[row.address] ?? row.address) \(row.status) \(row.checkCode ?? "-")"
                + "\(row.checkMilliseconds.map { " \($0) ms" } ?? "")\(row.checkDetail.map { " (\($0))" } ?? "")"
        }.sorted().joined(separator: ", ")
    }
}
