import FoundationEssentials

/// What the registrar needs to know of one container, read from `GET /containers/{id}/json`.
/// A plain value: the naming rules (`RegistrationRules`) turn it into registrations.
public struct ContainerInfo: Sendable, Equatable {
    /// The full 64-hex id.
    public var id: String
    /// The name without Docker's leading `/`.
    public var name: String
    /// `Config.Image` as the user wrote it (`jwilder/whoami:latest`).
    public var image: String
    public var labels: [String: String]
    /// `Config.Env` as a map (`KEY=VALUE`; a bare `KEY` maps to "").
    public var environment: [String: String]
    /// Published bindings, in Docker's order.
    public var ports: [PublishedPort]
    public var running: Bool
    public var paused: Bool
    /// `State.Health.Status` (`starting`, `healthy`, `unhealthy`), nil without a health check.
    public var health: String?

    public init(id: String, name: String = "", image: String, labels: [String: String] = [:],
                environment: [String: String] = [:], ports: [PublishedPort] = [],
                running: Bool = true, paused: Bool = false, health: String? = nil) {
        self.id = id
        self.name = name
        self.image = image
        self.labels = labels
        self.environment = environment
        self.ports = ports
        self.running = running
        self.paused = paused
        self.health = health
    }

    /// The 12-character short id, as `docker ps` shows it.
    public var shortID: String { String(id.prefix(12)) }
}

/// One published binding: container port `privatePort/proto` on `hostIP:publicPort`.
public struct PublishedPort: Sendable, Equatable, Hashable {
    public var privatePort: Int
    public var proto: String
    /// As Docker reports it: `0.0.0.0`, `::` or "" mean every address.
    public var hostIP: String
    public var publicPort: Int

    public init(privatePort: Int, proto: String = "tcp", hostIP: String, publicPort: Int) {
        self.privatePort = privatePort
        self.proto = proto
        self.hostIP = hostIP
        self.publicPort = publicPort
    }
}

/// One row of `GET /containers/json`: enough to tell which containers changed since the last
/// inspect (id, state, published ports).
public struct ContainerSummary: Sendable, Equatable {
    public var id: String
    public var paused: Bool
    public var ports: Set<PublishedPort>
}

/// Decoding of Docker's JSON. Unknown fields are ignored; a missing optional section is empty.
/// Throws `DockerError.badResponse` for a body that is not the expected shape.
enum DockerJSON {
    private struct Inspect: Decodable {
        struct Config: Decodable {
            var Image: String?
            var Labels: [String: String]?
            var Env: [String]?
        }
        struct State: Decodable {
            struct Health: Decodable { var Status: String? }
            var Running: Bool?
            var Paused: Bool?
            var Health: Health?
        }
        struct Binding: Decodable {
            var HostIp: String?
            var HostPort: String?
        }
        struct NetworkSettings: Decodable {
            var Ports: [String: [Binding]?]?
        }
        var Id: String
        var Name: String?
        var Image: String?
        var Config: Config?
        var State: State?
        var NetworkSettings: NetworkSettings?
    }

    private struct Summary: Decodable {
        struct Port: Decodable {
            var IP: String?
            var PrivatePort: Int?
            var PublicPort: Int?
            var `Type`: String?
        }
        var Id: String
        var State: String?
        var Ports: [Port]?
    }

    static func container(from data: Data) throws -> ContainerInfo {
        let inspect: Inspect
        do {
            inspect = try JSONDecoder().decode(Inspect.self, from: data)
        } catch {
            throw DockerError.badResponse("container inspect: \(error)")
        }
        var ports: [PublishedPort] = []
        // Docker's map has no order; sort by container port so names and logs are stable.
        for (key, bindings) in (inspect.NetworkSettings?.Ports ?? [:]).sorted(by: { $0.key < $1.key }) {
            let parts = key.split(separator: "/", maxSplits: 1)
            guard let privatePort = parts.first.flatMap({ Int($0) }) else { continue }
            let proto = parts.count > 1 ? String(parts[1]) : "tcp"
            for binding in bindings ?? [] {
                guard let text = binding.HostPort, let publicPort = Int(text), publicPort > 0 else { continue }
                ports.append(PublishedPort(privatePort: privatePort, proto: proto, hostIP: binding.HostIp ?? "", publicPort: publicPort))
            }
        }
        var environment: [String: String] = [:]
        for entry in inspect.Config?.Env ?? [] {
            if let equals = entry.firstIndex(of: "=") {
                environment[String(entry[..<equals])] = String(entry[entry.index(after: equals)...])
            } else {
                environment[entry] = ""
            }
        }
        var name = inspect.Name ?? ""
        if name.hasPrefix("/") { name.removeFirst() }
        return ContainerInfo(
            id: inspect.Id, name: name, image: inspect.Config?.Image ?? inspect.Image ?? "",
            labels: inspect.Config?.Labels ?? [:], environment: environment, ports: ports,
            running: inspect.State?.Running ?? false, paused: inspect.State?.Paused ?? false,
            health: inspect.State?.Health?.Status)
    }

    static func summaries(from data: Data) throws -> [ContainerSummary] {
        let rows: [Summary]
        do {
            rows = try JSONDecoder().decode([Summary].self, from: data)
        } catch {
            throw DockerError.badResponse("container list: \(error)")
        }
        return rows.map { row in
            var ports = Set<PublishedPort>()
            for port in row.Ports ?? [] {
                guard let privatePort = port.PrivatePort, let publicPort = port.PublicPort, publicPort > 0 else { continue }
                ports.insert(PublishedPort(privatePort: privatePort, proto: port.`Type` ?? "tcp", hostIP: port.IP ?? "", publicPort: publicPort))
            }
            return ContainerSummary(id: row.Id, paused: row.State == "paused", ports: ports)
        }
    }
}
