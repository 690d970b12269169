import BerthEngine
import BerthRegistry
import BerthSystem
import BerthHealth

/// A host name as `HostResolver` knows it at the moment a table is built.
public enum HostResolution: Sendable, Equatable {
    /// The address to dial (its port is replaced by the instance's).
    case resolved(SocketAddress)
    /// Asked for, no answer yet.
    case pending
    /// The last lookup failed; the reason in words.
    case failed(String)
}

/// A table to publish and what could not go in it.
public struct RoutingBuild: Sendable, Equatable {
    /// Stamped with the catalog's revision; frontends sorted by name, backends by instance id.
    public var table: RoutingTable
    /// Check settings of the services whose `_config` has a `check`, by frontend name (= the
    /// service name); the others use the process-wide settings.
    public var checks: [String: CheckSettings]
    /// Services or instances left out, each with its reason, sorted by service.
    public var problems: [ServiceProblem]
    /// Services served with no instances (lingering).
    public var lingering: [String]
    /// When (monotonic ms, the clock `now` was read from) to build again so that a lingering
    /// frontend closes on time; nil when nothing waits.
    public var nextEvaluation: Int64?
    /// Host names (not IP addresses) of the instances: what `HostResolver.track` should follow.
    public var hostNames: Set<String> = []
}

/// Why a service (or one of its instances) is not served.
public struct ServiceProblem: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// No `listen` in any instance, no `_config` listen, no `port` key, no default.
        case noListenPort
        /// Another service holds the port (the one serving it before, else the first by name).
        case portConflict(port: UInt16, heldBy: String)
        /// Instances name different listen ports; the lowest is used.
        case listenDisagreement(ports: [UInt16], used: UInt16)
        /// The instance's host name has no address (yet); the instance is left out.
        case unresolvedHost(instance: String, host: String, reason: String)
        /// The instance asks for a protocol other than tcp; it is left out.
        case unsupportedProtocol(instance: String, proto: String)
    }

    public var service: String
    public var kind: Kind

    /// Whether the service has no frontend because of it (the other kinds drop an instance,
    /// or nothing).
    public var isFatalForService: Bool {
        switch kind {
        case .noListenPort, .portConflict: true
        case .listenDisagreement, .unresolvedHost, .unsupportedProtocol: false
        }
    }

    public var description: String {
        switch kind {
        case .noListenPort:
            "service '\(service)': no listen port (no 'listen' in its instances or _config, no port key, no --default-listen)"
        case .portConflict(let port, let holder):
            "service '\(service)': port \(port) is already served for '\(holder)'"
        case .listenDisagreement(let ports, let used):
            "service '\(service)': instances disagree on the listen port (\(ports.map(String.init).joined(separator: ", "))); using \(used)"
        case .unresolvedHost(let instance, let host, let reason):
            "service '\(service)': instance '\(instance)': host '\(host)' not resolved (\(reason))"
        case .unsupportedProtocol(let instance, let proto):
            "service '\(service)': instance '\(instance)': protocol '\(proto)' is not served (tcp only)"
        }
    }
}

/// What the catalog remembers between builds: ports served, since when a service is empty,
/// and each service's frontend as last built.
struct RoutingMemory: Sendable {
    /// Service → listen port of its frontend in the last build.
    var served: [String: UInt16] = [:]
    /// Service → the `now` of the first build that saw it with no instance.
    var emptySince: [String: Int64] = [:]
    /// Service → its frontend as last built, reused while the service's keys do not change: a
    /// change rebuilds one service, not the table (a fleet host sees every change).
    var built: [String: BuiltService] = [:]
    /// The arguments the entries of `built` were made with (others: build everything again).
    var context: BuildContext?
}

/// The arguments of `routingTable` that every service's frontend depends on.
struct BuildContext: Sendable, Equatable {
    var bind: SocketAddress
    var defaults: FrontendSettings
    var checkDefaults: CheckSettings?
}

/// One service's part of a build, kept between builds.
struct BuiltService: Sendable {
    /// Before port conflicts are settled (they depend on the other services); nil when the
    /// service has no listen port.
    var frontend: Frontend?
    /// Its problems, in the order found (port conflicts are added per build).
    var problems: [ServiceProblem]
    var check: CheckSettings?
    /// Host names (not IP addresses) its instances name: while there is one, the service is
    /// built every time (a name's address may have changed).
    var hostNames: [String]
}

extension Catalog {
    /// Builds the routing table for the current catalog.
    ///
    /// - `bind`: the listen host (`--bind`); its port is ignored.
    /// - `defaults`: frontend settings that `_config` values override.
    /// - `checkDefaults`: the process-wide check settings that `_config`'s `check` overrides
    ///   (nil: HAProxy's defaults, `CheckSettings()`).
    /// - `now`: monotonic milliseconds (`MonotonicClock.milliseconds()`), for linger.
    /// - `resolve`: looks up a host name (`HostResolver.lookup`); IP literals and `localhost`
    ///   never reach it.
    ///
    /// Mutating only for the routing memory: which service held which port (the holder keeps
    /// it in a conflict) and when a service became empty (linger counts from the first build
    /// that saw it empty, so build after every change).
    public mutating func routingTable(
        bind: SocketAddress, defaults: FrontendSettings = FrontendSettings(), checkDefaults: CheckSettings? = nil,
        now: Int64, resolve: (String) -> HostResolution = { _ in .failed("no resolver") }
    ) -> RoutingBuild {
        var problems: [ServiceProblem] = []
        var candidates: [Frontend] = []
        var lingering: [String] = []
        var nextEvaluation: Int64?
        var hostNames = Set<String>()
        var memory = routingMemory
        let context = BuildContext(bind: bind, defaults: defaults, checkDefaults: checkDefaults)
        var changed = changedServices
        if memory.context != context {
            memory.context = context
            changed = nil
        }
        for name in changed ?? [] where services[name] == nil { memory.built.removeValue(forKey: name) }
        if changed == nil { memory.built = [:] }

        for name in Set(services.keys).union(memory.served.keys).sorted() {
            let service = services[name] ?? Service()
            if service.instances.isEmpty {
                memory.built.removeValue(forKey: name)
                // Linger: a service served before keeps its frontend, empty, for a while.
                guard let port = memory.served[name] else { continue }
                let since = memory.emptySince[name] ?? now
                let deadline = since + (service.config?.linger ?? options.linger)
                guard now < deadline else {
                    memory.served.removeValue(forKey: name)
                    memory.emptySince.removeValue(forKey: name)
                    continue
                }
                memory.emptySince[name] = since
                nextEvaluation = min(nextEvaluation ?? deadline, deadline)
                lingering.append(name)
                candidates.append(Frontend(name: name, listen: bind.withPort(port), backends: [],
                                           settings: service.config?.frontendSettings(over: defaults) ?? defaults))
                continue
            }
            memory.emptySince.removeValue(forKey: name)
            // Unchanged keys, and no instance named by host (whose address may have moved): the
            // frontend of the last build.
            var entry: BuiltService
            if let kept = memory.built[name], kept.hostNames.isEmpty, changed?.contains(name) == false {
                entry = kept
            } else {
                entry = build(name, service, context: context, resolve: resolve)
                memory.built[name] = entry
            }
            problems.append(contentsOf: entry.problems)
            hostNames.formUnion(entry.hostNames)
            guard let frontend = entry.frontend else {
                memory.served.removeValue(forKey: name)
                continue
            }
            candidates.append(frontend)
        }
        changedServices = []

        // One frontend per port: the service that served it in the last build keeps it; among
        // newcomers, the first by name.
        var holders: [UInt16: String] = [:]
        for frontend in candidates where memory.served[frontend.name] == frontend.listen.port {
            if holders[frontend.listen.port] == nil { holders[frontend.listen.port] = frontend.name }
        }
        for frontend in candidates where holders[frontend.listen.port] == nil {
            holders[frontend.listen.port] = frontend.name
        }
        var frontends: [Frontend] = []
        var checks: [String: CheckSettings] = [:]
        var served: [String: UInt16] = [:]
        for frontend in candidates {
            let port = frontend.listen.port
            guard holders[port] == frontend.name else {
                problems.append(ServiceProblem(service: frontend.name, kind: .portConflict(port: port, heldBy: holders[port]!)))
                memory.emptySince.removeValue(forKey: frontend.name)
                lingering.removeAll { $0 == frontend.name }
                continue
            }
            frontends.append(frontend)
            served[frontend.name] = port
            if let check = memory.built[frontend.name]?.check { checks[frontend.name] = check }
        }
        memory.served = served
        memory.emptySince = memory.emptySince.filter { served[$0.key] != nil }
        routingMemory = memory
        // By service; within one, in the order found (instances by id).
        problems = problems.enumerated()
            .sorted { ($0.element.service, $0.offset) < ($1.element.service, $1.offset) }
            .map(\.element)
        return RoutingBuild(table: RoutingTable(revision: UInt64(max(0, revision)), frontends: frontends),
                            checks: checks, problems: problems, lingering: lingering,
                            nextEvaluation: lingering.isEmpty ? nil : nextEvaluation, hostNames: hostNames)
    }

    /// One service's frontend, problems and check settings.
    private func build(_ name: String, _ service: Service, context: BuildContext,
                       resolve: (String) -> HostResolution) -> BuiltService {
        var problems: [ServiceProblem] = []
        let hostNames = service.instances.values.compactMap { $0.hostKind == .name && $0.host != "localhost" ? $0.host : nil }
        let check = service.config?.check.map { $0.settings(over: context.checkDefaults ?? CheckSettings()) }
        guard let port = listenPort(of: name, service, problems: &problems) else {
            problems.append(ServiceProblem(service: name, kind: .noListenPort))
            return BuiltService(frontend: nil, problems: problems, check: check, hostNames: hostNames)
        }
        let backends = self.backends(of: name, service, resolve: resolve, problems: &problems)
        let frontend = Frontend(name: name, listen: context.bind.withPort(port), backends: backends,
                                settings: service.config?.frontendSettings(over: context.defaults) ?? context.defaults)
        return BuiltService(frontend: frontend, problems: problems, check: check, hostNames: hostNames)
    }

    /// The listen port: instances' `listen` (the lowest if they disagree), else `_config`'s,
    /// else the seed's `port` key, else `defaultListen`.
    private func listenPort(of name: String, _ service: Service, problems: inout [ServiceProblem]) -> UInt16? {
        let wanted = Set(service.instances.values.compactMap(\.listen)).sorted()
        if let lowest = wanted.first {
            if wanted.count > 1 {
                problems.append(ServiceProblem(service: name, kind: .listenDisagreement(ports: wanted, used: lowest)))
            }
            return lowest
        }
        return service.config?.listen ?? service.seedPort ?? options.defaultListen
    }

    private func backends(of name: String, _ service: Service, resolve: (String) -> HostResolution,
                          problems: inout [ServiceProblem]) -> [Backend] {
        var backends: [Backend] = []
        for id in service.instances.keys.sorted() {
            let instance = service.instances[id]!
            if let proto = instance.proto, proto.lowercased() != "tcp" {
                problems.append(ServiceProblem(service: name, kind: .unsupportedProtocol(instance: id, proto: proto)))
                continue
            }
            let address: SocketAddress
            if let literal = try? SocketAddress(host: instance.host, port: instance.port) {
                address = literal
            } else {
                switch resolve(instance.host) {
                case .resolved(let resolved):
                    address = resolved.withPort(instance.port)
                case .pending:
                    problems.append(ServiceProblem(service: name, kind: .unresolvedHost(instance: id, host: instance.host, reason: "lookup pending")))
                    continue
                case .failed(let reason):
                    problems.append(ServiceProblem(service: name, kind: .unresolvedHost(instance: id, host: instance.host, reason: reason)))
                    continue
                }
            }
            backends.append(Backend(name: id, address: address, enabled: !instance.draining, weight: instance.weight ?? 1))
        }
        return backends
    }
}
