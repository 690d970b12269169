import BerthSystem
import BerthTestSupport
import Glibc

/// Where the fleet's processes run.
///
/// - `namespaces` (the default where the test bed can be built): one network namespace per
///   simulated host (`h0`, `h1`, …), one for etcd and one for the gRPC proxy, all on one bridge
///   of a private /24 (`NetworkTestBed`): every host reaches etcd over a veth pair and a bridge,
///   through its own TCP stack, as a real fleet does, and binds its services on its own address.
///   The bench reaches etcd through a relay (`NamespaceRelay`) and reads its /metrics from
///   inside etcd's namespace.
/// - `loopback`: every process on this machine's loopback, each host on an address of its own
///   (127.77.X.Y), etcd and the proxy on 127.0.0.1 and free ports.
final class FleetNetwork {
    /// etcd's and the proxy's client port on the bed (each on its own host).
    static let bedPort: UInt16 = 2379
    static let bedPeerPort: UInt16 = 2380
    /// The bed's hosts besides the fleet's: `NetworkTestBed` numbers at most this many.
    static let otherHosts = 2

    let bed: NetworkTestBed?
    let etcdClientPort: UInt16
    let etcdPeerPort: UInt16
    let proxyPort: UInt16
    /// Where the bench's own etcd client connects (the relay on the bed).
    private(set) var benchEndpoint: SocketAddress
    private var relay: NamespaceRelay?

    var name: String { bed == nil ? "loopback" : "namespaces" }

    /// Why the fleet cannot run on the bed (nil: it can), for `hosts` simulated hosts.
    static func bedUnavailable(hosts: Int) -> String? {
        if let reason = NetworkTestBed.unavailableReason() { return reason }
        if hosts + otherHosts > NetworkTestBed.maximumHosts {
            return "\(hosts) hosts do not fit the bed's /24 (at most \(NetworkTestBed.maximumHosts - otherHosts))"
        }
        return nil
    }

    /// The bed of `hosts` hosts (plus etcd and proxy), or loopback when `namespaces` is false.
    init(hosts: Int, namespaces: Bool) throws(BenchError) {
        if namespaces {
            let names = ["etcd", "proxy"] + (0..<hosts).map { "h\($0)" }
            let started = MonotonicClock.milliseconds()
            let bed: NetworkTestBed
            do {
                bed = try NetworkTestBed(hosts: names)
            } catch {
                throw .child("the network test bed: \(error)")
            }
            progress("fleet: test bed of \(names.count) network namespaces built in \(MonotonicClock.milliseconds() - started) ms")
            self.bed = bed
            etcdClientPort = Self.bedPort
            etcdPeerPort = Self.bedPeerPort
            proxyPort = Self.bedPort
            let etcd = try Self.parse(bed.host("etcd").address, port: Self.bedPort)
            let relay = try NamespaceRelay(namespace: bed.host("etcd").namespace, target: etcd)
            self.relay = relay
            benchEndpoint = relay.address
        } else {
            bed = nil
            etcdClientPort = try Launcher.freePort()
            etcdPeerPort = try Launcher.freePort()
            proxyPort = try Launcher.freePort()
            benchEndpoint = SocketAddress(ipv4: (127, 0, 0, 1), port: etcdClientPort)
        }
    }

    /// Stops the relay and removes the namespaces (with whatever still runs in them).
    func remove() {
        relay?.stop()
        relay = nil
        bed?.remove()
    }

    // MARK: Addresses

    /// The address of a role (`etcd`, `proxy`, or host N's `h<N>`) as the others reach it.
    func address(of role: String) -> String {
        if let bed { return bed.host(role).address }
        if role.hasPrefix("h"), let index = Int(role.dropFirst()) { return "127.77.\(index / 250).\(index % 250 + 1)" }
        return "127.0.0.1"
    }

    var etcdAddress: SocketAddress { (try? Self.parse(address(of: "etcd"), port: etcdClientPort))! }
    var proxyAddress: SocketAddress { (try? Self.parse(address(of: "proxy"), port: proxyPort))! }

    private static func parse(_ host: String, port: UInt16) throws(BenchError) -> SocketAddress {
        do {
            return try SocketAddress(parsing: "\(host):\(port)")
        } catch {
            throw .child("bad address \(host):\(port): \(error)")
        }
    }

    // MARK: Processes and sockets

    /// `path arguments` to run as `role`: inside its namespace on the bed (`ip netns exec`,
    /// which execs the program: same PID), as it is on loopback.
    /// `favoured`: at nice −10 (`nice` execs the rest; every thread inherits it), for etcd and
    /// the proxy, which a real fleet runs on machines of their own: among 400 host processes on
    /// two cores at nice 0, etcd fell behind applying its own log ("waiting for the applied
    /// index took too long") and the registrars' writes timed out.
    /// The others at nice 0, whatever the bench's own nice value (`FleetScenario` runs at −10).
    func command(as role: String, _ path: String, _ arguments: [String], favoured: Bool = false) -> (path: String, arguments: [String]) {
        var command = bed.map { [Self.ipPath, "netns", "exec", $0.host(role).namespace, path] + arguments } ?? [path] + arguments
        let change = (favoured ? -10 : 0) - Int(getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0))
        if change != 0, let nice = Self.nicePath { command = [nice, "-n", "\(change)"] + command }
        return (command[0], Array(command.dropFirst()))
    }

    static let nicePath: String? = ["/usr/bin/nice", "/bin/nice"].first { access($0, X_OK) == 0 }

    static let ipPath: String = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first { access($0, X_OK) == 0 } ?? "ip"

    /// `body` with its sockets made in `role`'s namespace (as it is on loopback); nil when the
    /// namespace cannot be entered.
    func inside<T>(_ role: String, _ body: () -> T?) -> T? {
        guard let bed else { return body() }
        return (try? bed.withNetwork(of: role, body)) ?? nil
    }

    func canConnect(from role: String, to address: SocketAddress) -> Bool {
        inside(role) { Launcher.canConnect(to: address) ? true : nil } ?? false
    }

    /// GET `path` from `address`, from inside `role`'s namespace.
    func fetch(from role: String, _ address: SocketAddress, path: String) -> [UInt8]? {
        inside(role) { Launcher.fetch(from: address, path: path, stepTimeout: 2_000, limit: 4 << 20) }
    }
}
