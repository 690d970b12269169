// Several hosts on one machine, for failure tests that real networks inflict and loopback never
// does: a host that stops answering (no RST), a partition, delay, loss.
//
// Each host is a network namespace with `lo` up and one veth (`eth0`, an address in
// 10.213.77.0/24). The other end of every veth sits in a "switch" namespace of the bed's own,
// attached to a bridge there. Nothing is added to the root namespace, so beds of several test
// processes (or several beds of one process) never collide, and the /24 exists only inside them.
// Namespaces are named `berth-<pid>-<bed>-<host>`; a new bed first removes those of earlier test
// processes that died (their pid is gone) before they could clean up.
//
// Faults (NetworkFaults.swift) are iptables rules inside a host's namespace, the switch-side
// veth going down, and an NFQUEUE delayer (PacketDelayer.swift: this kernel has no netem).
import BerthSystem
import Foundation
import Glibc
import Synchronization

public final class NetworkTestBed: @unchecked Sendable {
    public struct Host: Sendable {
        public let name: String
        public let namespace: String
        /// Its only address, `10.213.77.x`, on its `eth0`.
        public let address: String
        /// Its veth's other end, in the switch namespace (`p<index>`).
        let switchPort: String
    }

    /// The bed's network; every host gets `subnet.(firstHost + index)`.
    public static let subnet = "10.213.77"
    static let firstHost = 10
    /// Hosts one bed can number: `subnet.(firstHost)` to `subnet.249`.
    public static let maximumHosts = 240
    /// Interface names: the host side, the bridge (both ≤ 15 characters).
    public static let hostInterface = "eth0"
    static let bridge = "br0"
    static let namePrefix = "berth-"

    public let hosts: [Host]
    /// `berth-<pid>-<bed>`: the prefix of every namespace of this bed.
    public let prefix: String
    let switchNamespace: String

    // Guarded by `lock`: what remove() must undo.
    let lock = NSLock()
    var createdNamespaces: [String] = []
    var processes: [SpawnedProcess] = []
    var impairments: [String: Impairments] = [:]
    var removed = false

    private static let sequence = Atomic<Int>(0)

    /// Why the bed cannot run here, or nil when it can (tests skip with the reason).
    public static func unavailableReason() -> String? { availability }

    private static let availability: String? = {
        if getuid() != 0 { return "network namespaces need root" }
        if which("ip") == nil { return "`ip` (iproute2) is not installed" }
        if which("iptables") == nil { return "`iptables` is not installed" }
        let probe = "\(namePrefix)\(getpid())-probe"
        guard let added = try? SpawnedProcess.run("ip", ["netns", "add", probe], timeout: 10) else {
            return "`ip netns add` could not run"
        }
        guard added.code == 0 else { return "`ip netns add` fails: \(added.error.trimmingCharacters(in: .whitespacesAndNewlines))" }
        _ = try? SpawnedProcess.run("ip", ["netns", "del", probe], timeout: 10)
        return nil
    }()

    /// Builds the hosts (names: letters, digits, `-`; not `switch`) and the switch. Throws
    /// FixtureFailure (after removing what was built) when a step fails.
    public init(hosts names: [String]) throws {
        if let reason = Self.unavailableReason() { throw FixtureFailure(reason) }
        let allowed = Set("abcdefghijklmnopqrstuvwxyz0123456789-")
        guard !names.isEmpty, names.count <= Self.maximumHosts, Set(names).count == names.count,
              names.allSatisfy({ !$0.isEmpty && $0 != "switch" && $0.allSatisfy(allowed.contains) }) else {
            throw FixtureFailure("bad host names \(names): unique, lowercase letters, digits and '-', not 'switch'")
        }
        Self.removeLeftovers()
        let prefix = "\(Self.namePrefix)\(getpid())-\(Self.sequence.add(1, ordering: .relaxed).newValue)"
        self.prefix = prefix
        switchNamespace = "\(prefix)-switch"
        hosts = names.enumerated().map { index, name in
            Host(name: name, namespace: "\(prefix)-\(name)", address: "\(Self.subnet).\(Self.firstHost + index)",
                 switchPort: "p\(index)")
        }
        do {
            try build()
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    public func host(_ name: String) -> Host {
        guard let host = hosts.first(where: { $0.name == name }) else { preconditionFailure("no host '\(name)' in the bed") }
        return host
    }

    private func build() throws {
        try addNamespace(switchNamespace)
        try ip(["-n", switchNamespace, "link", "set", "lo", "up"])
        try ip(["-n", switchNamespace, "link", "add", Self.bridge, "type", "bridge"])
        try ip(["-n", switchNamespace, "link", "set", Self.bridge, "up"])
        for host in hosts {
            try addNamespace(host.namespace)
            try ip(["-n", host.namespace, "link", "set", "lo", "up"])
            // Made inside the host, its peer moved straight into the switch: no name is ever
            // taken in the root namespace.
            try ip(["-n", host.namespace, "link", "add", Self.hostInterface, "type", "veth",
                    "peer", "name", host.switchPort, "netns", switchNamespace])
            try ip(["-n", host.namespace, "addr", "add", "\(host.address)/24", "dev", Self.hostInterface])
            try ip(["-n", host.namespace, "link", "set", Self.hostInterface, "up"])
            try ip(["-n", switchNamespace, "link", "set", host.switchPort, "master", Self.bridge, "up"])
        }
        try allowBridgedForwarding()
    }

    /// With br_netfilter, bridged frames cross the switch namespace's iptables FORWARD chain; a
    /// fresh namespace's policy is ACCEPT, but should it be DROP the bridge is let through.
    private func allowBridgedForwarding() throws {
        let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables"
        let filtered = try withNamespace(switchNamespace) { access(sysctl, F_OK) == 0 }
        guard filtered else { return }
        let rules = try runIn(namespace: switchNamespace, "iptables", ["-w", "5", "-S", "FORWARD"])
        if rules.contains("-P FORWARD DROP") {
            _ = try runIn(namespace: switchNamespace, "iptables",
                          ["-w", "5", "-I", "FORWARD", "-i", Self.bridge, "-o", Self.bridge, "-j", "ACCEPT"])
        }
    }

    private func addNamespace(_ name: String) throws {
        try ip(["netns", "add", name])
        lock.withLock { createdNamespaces.append(name) }
    }

    // MARK: - Commands and processes

    /// Runs a command inside a host and waits (at most `timeout` seconds, then SIGKILL); its
    /// stdout. Throws FixtureFailure on a non-zero exit, with stderr.
    @discardableResult
    public func run(in host: String, _ executable: String, _ arguments: [String], environment: [String: String] = [:],
                    timeout: Double = 20) throws -> String {
        try runIn(namespace: self.host(host).namespace, executable, arguments, environment: environment, timeout: timeout)
    }

    func runIn(namespace: String, _ executable: String, _ arguments: [String], environment: [String: String] = [:],
               timeout: Double = 20) throws -> String {
        let result = try SpawnedProcess.run("ip", ["netns", "exec", namespace, executable] + arguments,
                                            environment: environment, timeout: timeout)
        guard result.code == 0 else {
            throw FixtureFailure("in \(namespace): \(([executable] + arguments).joined(separator: " ")) exited \(result.code)"
                                 + "\(result.code == 128 + SIGKILL ? " (killed after \(timeout) s?)" : ""): \(result.error.suffix(1000))")
        }
        return result.output
    }

    /// A long-running child inside the host: `ip netns exec NS executable arguments` (ip execs
    /// the program, so the pid is the program's). Killed by PID in remove() at the latest.
    public func spawn(in host: String, _ executable: String, _ arguments: [String],
                      environment: [String: String] = [:]) throws -> SpawnedProcess {
        let namespace = self.host(host).namespace
        let process = try SpawnedProcess("ip", ["netns", "exec", namespace, executable] + arguments, environment: environment)
        let wasRemoved = lock.withLock {
            if !removed { processes.append(process) }
            return removed
        }
        if wasRemoved {
            process.stop(grace: 0)
            throw FixtureFailure("the bed was removed")
        }
        return process
    }

    /// Runs `body` on the calling thread switched into the host's network namespace (setns on
    /// this thread only), and switches back after, also when it throws. Sockets made inside
    /// belong to that host; threads started inside start in it.
    public func withNetwork<T>(of host: String, _ body: () throws -> T) throws -> T {
        try withNamespace(self.host(host).namespace, body)
    }

    func withNamespace<T>(_ namespace: String, _ body: () throws -> T) throws -> T {
        try Self.withNetworkNamespace(namespace, body)
    }

    /// `withNetwork` for any namespace of `/run/netns` (one a test made with `ip netns add`).
    public static func withNetworkNamespace<T>(_ namespace: String, _ body: () throws -> T) throws -> T {
        let original = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard original >= 0 else { throw FixtureFailure("open /proc/thread-self/ns/net: \(String(cString: strerror(errno)))") }
        defer { close(original) }
        let target = open("/run/netns/\(namespace)", O_RDONLY | O_CLOEXEC)
        guard target >= 0 else { throw FixtureFailure("open /run/netns/\(namespace): \(String(cString: strerror(errno)))") }
        defer { close(target) }
        guard Self.setNamespace(target, Self.newNetworkNamespace) == 0 else {
            throw FixtureFailure("setns \(namespace): \(String(cString: strerror(errno)))")
        }
        defer {
            // A thread left in a host's namespace would make every later socket of it wrong.
            if Self.setNamespace(original, Self.newNetworkNamespace) != 0 {
                fatalError("setns back to the original network namespace: \(String(cString: strerror(errno)))")
            }
        }
        return try body()
    }

    /// CLONE_NEWNET; setns is GNU-only, so Glibc's module does not declare it.
    private static let newNetworkNamespace: CInt = 0x4000_0000
    private typealias SetNamespace = @convention(c) (CInt, CInt) -> CInt
    private static let setNamespace: SetNamespace = {
        guard let symbol = dlsym(nil, "setns") else { fatalError("setns is missing from the C library") }
        return unsafeBitCast(symbol, to: SetNamespace.self)
    }()

    // MARK: - Removal

    /// Tears everything down: the delayers, the processes spawned here (by PID), the
    /// namespaces (which take the veths and the bridge with them). Idempotent; deinit calls it.
    public func remove() {
        let (namespaces, children, delayers) = lock.withLock { () -> ([String], [SpawnedProcess], [PacketDelayer]) in
            if removed { return ([], [], []) }
            removed = true
            defer {
                createdNamespaces = []
                processes = []
                impairments = [:]
            }
            return (createdNamespaces, processes, impairments.values.compactMap(\.delayer))
        }
        for delayer in delayers { delayer.stop() }
        // Last started, first stopped: clients go before the servers they talk to (a registrar's
        // SIGTERM revokes its lease while etcd still runs).
        for child in children.reversed() { child.stop(grace: 2) }
        for namespace in namespaces.reversed() {
            _ = try? SpawnedProcess.run("ip", ["netns", "del", namespace], timeout: 10)
        }
    }

    /// Removes namespaces of earlier test processes that are gone (`berth-<pid>-…` whose pid
    /// no longer exists), after killing what still runs inside them (children of that dead
    /// process: nothing else joins these namespaces).
    static func removeLeftovers() {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/run/netns") else { return }
        for name in names where name.hasPrefix(namePrefix) {
            let digits = name.dropFirst(namePrefix.count).prefix { $0.isNumber }
            guard let owner = pid_t(digits), owner != getpid(), name.dropFirst(namePrefix.count + digits.count).hasPrefix("-"),
                  kill(owner, 0) != 0, errno == ESRCH else { continue }
            if let pids = try? SpawnedProcess.run("ip", ["netns", "pids", name], timeout: 10) {
                for line in pids.output.split(separator: "\n") {
                    if let pid = pid_t(line.trimmingCharacters(in: .whitespaces)), pid > 1 { kill(pid, SIGKILL) }
                }
            }
            _ = try? SpawnedProcess.run("ip", ["netns", "del", name], timeout: 10)
        }
    }

    func ip(_ arguments: [String]) throws {
        let result = try SpawnedProcess.run("ip", arguments, timeout: 10)
        guard result.code == 0 else {
            throw FixtureFailure("ip \(arguments.joined(separator: " ")) exited \(result.code): \(result.error)")
        }
    }

    static func which(_ tool: String) -> String? {
        for folder in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/sbin:/usr/bin:/sbin:/bin").split(separator: ":") {
            let path = "\(folder)/\(tool)"
            if access(path, X_OK) == 0 { return path }
        }
        return nil
    }
}
