/// One instance to register: what goes into `<prefix>/<service>/<instance>`.
public struct Registration: Sendable, Equatable {
    public var service: String
    public var instance: String
    /// The address other hosts dial.
    public var host: String
    /// The published (host) port to dial.
    public var port: Int
    /// The service's own port (the container's private port), where discovery listens.
    public var listen: Int
    public var weight: Int
    public var tags: [String]
    public var meta: [String: String]
    /// Proxies take no new connections to a draining instance.
    public var draining: Bool

    public init(service: String, instance: String, host: String, port: Int, listen: Int, weight: Int = 1,
                tags: [String] = [], meta: [String: String] = [:], draining: Bool = false) {
        self.service = service
        self.instance = instance
        self.host = host
        self.port = port
        self.listen = listen
        self.weight = weight
        self.tags = tags
        self.meta = meta
        self.draining = draining
    }
}

/// The naming rules (README, `berth register`), pure. For each published TCP port of a container:
///
/// - service name: label `berth.service.<port>`, else env `SERVICE_<port>_NAME`, else label
///   `berth.service`, else env `SERVICE_NAME`, else the image's repository name without registry,
///   namespace, tag or digest (`jwilder/whoami:latest` → `whoami`). With several published ports,
///   a name that was not set per port gets `-<port>` (registrator's rule);
/// - instance: the 12-character container id, `-<port>` appended with several ports;
/// - host: the binding's HostIp when it is a specific address, else `--host-ip`; a wildcard
///   binding without `--host-ip` cannot be dialled from elsewhere and is skipped with a warning;
/// - opt out: label `berth.ignore` true/1/yes or env `SERVICE_IGNORE` set (whole container),
///   env `SERVICE_<port>_IGNORE` set (one port);
/// - weight: label `berth.weight` (0...256 as HAProxy's, default 1); tags: label `berth.tags` or env
///   `SERVICE_TAGS`, comma separated;
/// - draining: the container is paused or its health check says `unhealthy`.
/// `<port>` is always the container's private port.
public enum RegistrationRules {
    public static func registrations(for container: ContainerInfo, hostIP: String?) -> (registrations: [Registration], warnings: [String]) {
        guard container.running, !isIgnored(container) else { return ([], []) }
        let byPort = bindingsByPrivatePort(container.ports)
        let isGroup = byPort.count > 1
        let baseName = label(container, "berth.service") ?? environment(container, "SERVICE_NAME") ?? imageName(container.image)
        let tagsText = label(container, "berth.tags") ?? environment(container, "SERVICE_TAGS") ?? ""
        let tags = tagsText.split(separator: ",").map { String($0).trimmedSpaces }.filter { !$0.isEmpty }
        let weight = label(container, "berth.weight").flatMap { Int($0) }.map { min(max($0, 0), 256) } ?? 1
        var meta = ["container": container.name, "image": container.image]
        if meta["container"] == "" { meta["container"] = nil }
        let draining = container.paused || container.health == "unhealthy"

        var result: [Registration] = []
        var warnings: [String] = []
        for (privatePort, bindings) in byPort {
            if environment(container, "SERVICE_\(privatePort)_IGNORE") != nil { continue }
            guard let chosen = chooseBinding(bindings, hostIP: hostIP) else {
                warnings.append("container \(container.shortID) port \(privatePort): published on every address and no --host-ip/HOST_IP given; not registered")
                continue
            }
            let (binding, host) = chosen
            var service: String
            if let own = label(container, "berth.service.\(privatePort)") ?? environment(container, "SERVICE_\(privatePort)_NAME") {
                service = own
            } else {
                service = isGroup ? "\(baseName)-\(privatePort)" : baseName
            }
            service = service.trimmedSpaces
            guard !service.isEmpty else {
                warnings.append("container \(container.shortID) port \(privatePort): empty service name; not registered")
                continue
            }
            result.append(Registration(
                service: service, instance: isGroup ? "\(container.shortID)-\(privatePort)" : container.shortID,
                host: host, port: binding.publicPort, listen: privatePort, weight: weight, tags: tags, meta: meta,
                draining: draining))
        }
        return (result, warnings)
    }

    /// `jwilder/whoami:latest` → `whoami`; `registry:5000/team/app@sha256:…` → `app`.
    public static func imageName(_ image: String) -> String {
        var text = Substring(image)
        if let at = text.firstIndex(of: "@") { text = text[..<at] }
        if let slash = text.lastIndex(of: "/") { text = text[text.index(after: slash)...] }
        if let colon = text.firstIndex(of: ":") { text = text[..<colon] }
        return text.isEmpty ? "container" : String(text)
    }

    static func isIgnored(_ container: ContainerInfo) -> Bool {
        if let value = container.labels["berth.ignore"], ["true", "1", "yes"].contains(value.lowercased()) { return true }
        return environment(container, "SERVICE_IGNORE") != nil
    }

    /// TCP bindings grouped by container port, ascending.
    static func bindingsByPrivatePort(_ ports: [PublishedPort]) -> [(Int, [PublishedPort])] {
        var groups: [Int: [PublishedPort]] = [:]
        for port in ports where port.proto == "tcp" { groups[port.privatePort, default: []].append(port) }
        return groups.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }
    }

    /// Docker often publishes one port twice (`0.0.0.0` and `::`): a specific IPv4 binding is
    /// preferred, then any specific one, then a wildcard with `--host-ip`.
    static func chooseBinding(_ bindings: [PublishedPort], hostIP: String?) -> (PublishedPort, String)? {
        let specific = bindings.filter { !isWildcard($0.hostIP) }
        if let binding = specific.first(where: { !$0.hostIP.contains(":") }) ?? specific.first {
            return (binding, binding.hostIP)
        }
        if let hostIP, !hostIP.isEmpty, let binding = bindings.first(where: { $0.hostIP != "::" }) ?? bindings.first {
            return (binding, hostIP)
        }
        return nil
    }

    static func isWildcard(_ address: String) -> Bool {
        address.isEmpty || address == "0.0.0.0" || address == "::" || address == "[::]"
    }

    private static func label(_ container: ContainerInfo, _ key: String) -> String? {
        guard let value = container.labels[key], !value.isEmpty else { return nil }
        return value
    }

    private static func environment(_ container: ContainerInfo, _ key: String) -> String? {
        guard let value = container.environment[key], !value.isEmpty else { return nil }
        return value
    }
}

/// `--static NAME=HOST:PORT[@LISTEN]`: a service that is not a container. The instance id is
/// `HOST:PORT`, unique on every host. IPv6 hosts are written in brackets: `[::1]:8001`.
public struct StaticService: Sendable, Equatable {
    public let registration: Registration

    public init(parsing text: String) throws(StaticServiceError) {
        guard let equals = text.firstIndex(of: "=") else { throw StaticServiceError(text, "expected NAME=HOST:PORT[@LISTEN]") }
        let name = String(text[..<equals]).trimmedSpaces
        guard !name.isEmpty else { throw StaticServiceError(text, "empty service name") }
        var address = Substring(text[text.index(after: equals)...])
        var listen: Int?
        if let at = address.lastIndex(of: "@") {
            guard let value = Int(address[address.index(after: at)...]), (1...65535).contains(value) else {
                throw StaticServiceError(text, "LISTEN must be a port from 1 to 65535")
            }
            listen = value
            address = address[..<at]
        }
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
              (1...65535).contains(port) else {
            throw StaticServiceError(text, "expected HOST:PORT with a port from 1 to 65535")
        }
        var host = address[..<colon]
        if host.hasPrefix("[") && host.hasSuffix("]") {
            host = host.dropFirst().dropLast()
        } else if host.contains(":") {
            throw StaticServiceError(text, "write an IPv6 host in brackets: [::1]:8001")
        }
        guard !host.isEmpty, !host.contains(where: { $0 == " " || $0 == "/" }) else {
            throw StaticServiceError(text, "bad host '\(host)'")
        }
        let instance = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        registration = Registration(service: name, instance: instance, host: String(host), port: port,
                                    listen: listen ?? port, meta: ["static": "true"])
    }
}

public struct StaticServiceError: Error, Sendable, CustomStringConvertible {
    public let description: String
    init(_ text: String, _ reason: String) { description = "invalid static service '\(text)': \(reason)" }
}

extension String {
    var trimmedSpaces: String {
        var slice = self[...]
        while slice.first?.isWhitespace == true { slice = slice.dropFirst() }
        while slice.last?.isWhitespace == true { slice = slice.dropLast() }
        return String(slice)
    }
}
