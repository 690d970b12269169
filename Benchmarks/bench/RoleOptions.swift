import BerthEngine
import BerthSystem

/// The hidden roles: the processes the benchmark starts by re-executing itself.
enum Role: String, Sendable {
    /// Berth's engine serving the given frontends.
    case proxy
    /// A `WhoamiServer` (HTTP backend).
    case whoami
    /// A `BulkServer` (streams bytes to whoever connects).
    case bulk
    /// Stops a process the bench cannot stop itself once the bench is gone (HAProxy, which
    /// does not watch its stdin): SIGTERM, then SIGKILL, to `--pid` when its own stdin ends.
    case watchdog
    /// `--count` listening sockets that accept and close (the checks scenario's check targets).
    case listeners
    /// Bad and oversized requests to a stats server (StatsFuzzRole.swift).
    case statsFuzz = "stats-fuzz"
}

/// A frontend of the proxy role: `--frontend NAME --listen HOST:PORT --backend HOST:PORT[,...]`.
struct FrontendSpec: Sendable {
    var name: String
    var listen: SocketAddress?
    var backends: [SocketAddress] = []
}

/// Settings of a role process (the command line with `--role`).
struct RoleOptions: Sendable {
    var role: Role
    var relay: RelayMode = .splice
    var frontends: [FrontendSpec] = []
    var listen: SocketAddress?
    var name = "whoami"
    /// The whoami role reads a PROXY protocol header first on every connection.
    var acceptProxy = false
    /// CPU to pin to: the engine's worker for `proxy`, the whole process otherwise.
    var cpu: Int?
    /// The watchdog's charge, and a temporary directory it removes after stopping it.
    var watchedPID: Int32?
    var removeDirectory: String?
    /// Sockets of the `listeners` role.
    var count = 1_000
    /// The stats server the `stats-fuzz` role fuzzes, and its bounds.
    var target: SocketAddress?
    var seconds = 60.0
    var requests: UInt64 = 10_000_000
}

/// The command line of a role process.
extension CommandLineParser {
    /// Parses the arguments of a `--role` process (the bench re-executing itself).
    static func parseRole(_ arguments: [String]) throws(UsageError) -> RoleOptions {
        var reader = ArgumentReader(arguments)
        var options = RoleOptions(role: .proxy)
        while let flag = reader.next() {
            switch flag {
            case "--role":
                let text = try reader.value(for: flag)
                guard let role = Role(rawValue: text) else { throw UsageError(description: "--role: unknown role '\(text)'") }
                options.role = role
            case "--relay":
                let text = try reader.value(for: flag)
                guard let relay = RelayMode(rawValue: text) else { throw UsageError(description: "--relay: expected splice, copy or auto") }
                options.relay = relay
            case "--frontend":
                options.frontends.append(FrontendSpec(name: try reader.value(for: flag)))
            case "--listen":
                let address = try parseAddress(try reader.value(for: flag))
                if options.frontends.isEmpty {
                    options.listen = address
                } else {
                    options.frontends[options.frontends.count - 1].listen = address
                }
            case "--backend":
                guard !options.frontends.isEmpty else { throw UsageError(description: "--backend comes after --frontend NAME") }
                for part in try reader.value(for: flag).split(separator: ",") {
                    options.frontends[options.frontends.count - 1].backends.append(try parseAddress(String(part)))
                }
            case "--name": options.name = try reader.value(for: flag)
            case "--accept-proxy": options.acceptProxy = true
            case "--pid":
                let text = try reader.value(for: flag)
                guard let pid = Int32(text), pid > 1 else { throw UsageError(description: "--pid \(text): expected a process id") }
                options.watchedPID = pid
            case "--remove": options.removeDirectory = try reader.value(for: flag)
            case "--count":
                let text = try reader.value(for: flag)
                guard let count = Int(text), count >= 1, count <= 5_000 else {
                    throw UsageError(description: "--count \(text): expected a number of sockets from 1 to 5000")
                }
                options.count = count
            case "--target": options.target = try parseAddress(try reader.value(for: flag))
            case "--seconds":
                let text = try reader.value(for: flag)
                guard let seconds = Double(text), seconds > 0, seconds <= 3_600 else {
                    throw UsageError(description: "--seconds \(text): expected a number of seconds up to 3600")
                }
                options.seconds = seconds
            case "--requests":
                let text = try reader.value(for: flag)
                guard let requests = UInt64(text), requests >= 1 else { throw UsageError(description: "--requests \(text): expected a positive count") }
                options.requests = requests
            case "--cpu":
                let text = try reader.value(for: flag)
                guard let cpu = Int(text), cpu >= 0 else { throw UsageError(description: "--cpu \(text): expected a CPU number") }
                options.cpu = cpu
            default: throw UsageError(description: "unknown role argument '\(flag)'")
            }
        }
        if options.role == .proxy {
            guard !options.frontends.isEmpty else { throw UsageError(description: "--role proxy needs --frontend NAME --listen ADDRESS --backend ADDRESS") }
            for frontend in options.frontends where frontend.listen == nil || frontend.backends.isEmpty {
                throw UsageError(description: "frontend '\(frontend.name)' needs --listen and --backend")
            }
        } else if options.role == .watchdog {
            guard options.watchedPID != nil else { throw UsageError(description: "--role watchdog needs --pid PID") }
        } else if options.role == .statsFuzz {
            guard options.target != nil else { throw UsageError(description: "--role stats-fuzz needs --target HOST:PORT") }
        } else if options.role != .listeners && options.listen == nil {
            throw UsageError(description: "--role \(options.role.rawValue) needs --listen ADDRESS")
        }
        return options
    }

    private static func parseAddress(_ text: String) throws(UsageError) -> SocketAddress {
        do {
            return try SocketAddress(parsing: text)
        } catch {
            throw UsageError(description: "\(error)")
        }
    }
}
