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

/// What the catalog remembers between builds, per service (served now, or with keys), in
/// ascending order of name: the port it served, since when it is empty, its frontend as last
/// built. A build looks up only the services whose keys changed (a fleet host sees every
/// change, and a table holds a thousand services).
struct RoutingMemory: Sendable {
    struct Row: Sendable {
        var name: String
        /// Its frontend as last built (nil: not built, or no instance); reused while the
        /// service's keys do not change.
        var built: BuiltService?
        /// The listen port of its frontend in the last build.
        var served: UInt16?
        /// The `now` of the first build that saw it with no instance.
        var emptySince: Int64?
    }

    var rows: [Row] = []
    /// The arguments the rows were built with (others: build everything again).
    var context: BuildContext?
    /// The frontends of the last table built, and its serial: the next table says what
    /// differs from it (`RoutingTable.changes`).
    var lastFrontends: [Frontend] = []
    var lastSerial: UInt64 = 0
    /// The last build had no port conflict, no lingering service and no instance named by
    /// host: the next can build only the services whose keys changed (`changesOnly`). With it:
    /// the port each frontend serves, and the last build's checks and problems.
    var settled = false
    var ports: [UInt16: String] = [:]
    var lastChecks: [String: CheckSettings] = [:]
    var lastProblems: [ServiceProblem] = []
    /// Builds made from the changed services alone (tests).
    var builtByChanges = 0

    /// The table of a build, stamped with a new serial and what differs from the last one
    /// (`changed` when known, else found by comparing the two); remembered for the next.
    mutating func table(revision: Int64, frontends: [Frontend], changed: [String]? = nil) -> RoutingTable {
        let serial = RoutingTable.makeSerial()
        let changes = lastSerial == 0 ? nil
            : FrontendChanges(base: lastSerial, names: changed ?? RoutingTable.changedNames(from: lastFrontends, to: frontends))
        lastFrontends = frontends
        lastSerial = serial
        return RoutingTable(revision: UInt64(max(0, revision)), frontends: frontends, serial: serial, changes: changes)
    }

    /// Where `name` is, or would be inserted.
    func search(_ name: String) -> (index: Int, found: Bool) {
        var low = 0, high = rows.count
        while low < high {
            let middle = (low + high) / 2
            if rows[middle].name < name { low = middle + 1 } else { high = middle }
        }
        return (low, low < rows.count && rows[low].name == name)
    }
}

/// The arguments of `routingTable` that every service's frontend depends on.
struct BuildContext: Sendable, Equatable {
    var bind: SocketAddress
    var defaults: FrontendSettings
    var checkDefaults: CheckSettings?
}

/// One service's part of a build, kept between builds (a reference: a build passes a thousand
/// of them along).
final class BuiltService: Sendable {
    /// Before port conflicts are settled (they depend on the other services); nil when the
    /// service has no listen port.
    let frontend: Frontend?
    /// Its problems, in the order found (port conflicts are added per build).
    let problems: [ServiceProblem]
    let check: CheckSettings?
    /// `check != nil`, read without copying the settings (a build reads it for every service).
    let hasCheck: Bool
    /// Host names (not IP addresses) its instances name: while there is one, the service is
    /// built every time (a name's address may have changed).
    let hostNames: [String]

    init(frontend: Frontend?, problems: [ServiceProblem], check: CheckSettings?, hostNames: [String]) {
        self.frontend = frontend
        self.problems = problems
        self.check = check
        hasCheck = check != nil
        self.hostNames = hostNames
    }
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
        var lingering: [String] = []
        var nextEvaluation: Int64?
        var hostNames = Set<String>()
        // Taken out, so that its rows are changed in place and not copied for the change.
        var memory = routingMemory
        routingMemory = RoutingMemory()
        let context = BuildContext(bind: bind, defaults: defaults, checkDefaults: checkDefaults)
        if memory.settled, memory.context == context, let changed = changedServices,
           let build = changesOnly(changed.sorted(), &memory, context: context, resolve: resolve) {
            changedServices = []
            routingMemory = memory
            return build
        }
        var changed = changedServices
        if memory.context != context {
            memory.context = context
            changed = nil
        }
        // The rows to look at again: the changed services (a new one gets its row), or all.
        var dirty: [Bool]
        if let changed {
            dirty = [Bool](repeating: false, count: memory.rows.count)
            for name in changed {
                let (index, found) = memory.search(name)
                if found {
                    dirty[index] = true
                } else if services[name] != nil {
                    memory.rows.insert(RoutingMemory.Row(name: name), at: index)
                    dirty.insert(true, at: index)
                }
            }
        } else {
            var rows: [RoutingMemory.Row] = []
            var known = Set<String>()
            for row in memory.rows where row.served != nil {
                rows.append(RoutingMemory.Row(name: row.name, served: row.served, emptySince: row.emptySince))
                known.insert(row.name)
            }
            for name in services.keys where !known.contains(name) { rows.append(RoutingMemory.Row(name: name)) }
            memory.rows = rows.sorted { $0.name < $1.name }
            dirty = [Bool](repeating: true, count: memory.rows.count)
        }
        changedServices = []

        // Candidates: (row, frontend); the row's `built` holds its check settings.
        var candidates: [(row: Int, frontend: Frontend)] = []
        candidates.reserveCapacity(memory.rows.count)
        var gone: [Int] = []
        for index in memory.rows.indices {
            // Unchanged keys, and no instance named by host (whose address may have moved): the
            // frontend of the last build.
            if !dirty[index], let kept = memory.rows[index].built, kept.hostNames.isEmpty {
                if !kept.problems.isEmpty { problems.append(contentsOf: kept.problems) }
                if let frontend = kept.frontend { candidates.append((index, frontend)) }
                continue
            }
            let name = memory.rows[index].name
            let service = services[name] ?? Service()
            if service.instances.isEmpty {
                memory.rows[index].built = nil
                if services[name] == nil { gone.append(index) }
                // Linger: a service served before keeps its frontend, empty, for a while.
                guard let port = memory.rows[index].served else { continue }
                let since = memory.rows[index].emptySince ?? now
                let deadline = since + (service.config?.linger ?? options.linger)
                guard now < deadline else {
                    memory.rows[index].served = nil
                    memory.rows[index].emptySince = nil
                    continue
                }
                memory.rows[index].emptySince = since
                nextEvaluation = min(nextEvaluation ?? deadline, deadline)
                lingering.append(name)
                candidates.append((index, Frontend(name: name, listen: bind.withPort(port), backends: [],
                                                   settings: service.config?.frontendSettings(over: defaults) ?? defaults)))
                continue
            }
            memory.rows[index].emptySince = nil
            let entry = build(name, service, context: context, resolve: resolve)
            memory.rows[index].built = entry
            problems.append(contentsOf: entry.problems)
            hostNames.formUnion(entry.hostNames)
            if let frontend = entry.frontend { candidates.append((index, frontend)) }
        }
        for row in memory.rows { if let kept = row.built, !kept.hostNames.isEmpty { hostNames.formUnion(kept.hostNames) } }

        // One frontend per port: the service that served it in the last build keeps it; among
        // newcomers, the first by name. (No port asked twice, the common case: no dictionary.)
        var holders: [UInt16: Int]?
        var ports = [UInt64](repeating: 0, count: 1_024)
        for candidate in candidates {
            let port = Int(candidate.frontend.listen.port)
            if ports[port >> 6] & (1 << UInt64(port & 63)) != 0 {
                holders = [:]
                break
            }
            ports[port >> 6] |= 1 << UInt64(port & 63)
        }
        if holders != nil {
            var chosen: [UInt16: Int] = [:]
            for (position, candidate) in candidates.enumerated() where memory.rows[candidate.row].served == candidate.frontend.listen.port {
                if chosen[candidate.frontend.listen.port] == nil { chosen[candidate.frontend.listen.port] = position }
            }
            for (position, candidate) in candidates.enumerated() where chosen[candidate.frontend.listen.port] == nil {
                chosen[candidate.frontend.listen.port] = position
            }
            holders = chosen
        }
        var frontends: [Frontend] = []
        frontends.reserveCapacity(candidates.count)
        var checks: [String: CheckSettings] = [:]
        var winners = [Bool](repeating: false, count: memory.rows.count)
        for (position, candidate) in candidates.enumerated() {
            let port = candidate.frontend.listen.port
            if let holders, holders[port] != position {
                let holder = candidates[holders[port]!].frontend.name
                problems.append(ServiceProblem(service: candidate.frontend.name, kind: .portConflict(port: port, heldBy: holder)))
                lingering.removeAll { $0 == candidate.frontend.name }
                continue
            }
            frontends.append(candidate.frontend)
            winners[candidate.row] = true
            memory.rows[candidate.row].served = port
            if let built = memory.rows[candidate.row].built, built.hasCheck { checks[candidate.frontend.name] = built.check }
        }
        // Served only by the winners; a service with no keys left and nothing served goes.
        for index in memory.rows.indices where !winners[index] {
            memory.rows[index].served = nil
            memory.rows[index].emptySince = nil
        }
        for index in gone.reversed() where memory.rows[index].served == nil { memory.rows.remove(at: index) }
        let table = memory.table(revision: revision, frontends: frontends)
        problems = Self.sortedByService(problems)
        memory.settled = holders == nil && lingering.isEmpty && hostNames.isEmpty
        memory.ports = memory.settled ? Dictionary(frontends.lazy.map { ($0.listen.port, $0.name) }, uniquingKeysWith: { first, _ in first }) : [:]
        memory.lastChecks = checks
        memory.lastProblems = problems
        routingMemory = memory
        return RoutingBuild(table: table,
                            checks: checks, problems: problems, lingering: lingering,
                            nextEvaluation: lingering.isEmpty ? nil : nextEvaluation, hostNames: hostNames)
    }

    /// By service; within one, in the order found (instances by id).
    private static func sortedByService(_ problems: [ServiceProblem]) -> [ServiceProblem] {
        guard problems.count > 1 else { return problems }
        return problems.enumerated()
            .sorted { ($0.element.service, $0.offset) < ($1.element.service, $1.offset) }
            .map(\.element)
    }

    /// The build after a settled one (`RoutingMemory.settled`) from the changed services alone:
    /// the last table with their frontends replaced, added or removed. nil, with nothing
    /// changed, when the whole build is needed: a service that would linger, a port taken
    /// twice, an instance named by host.
    private func changesOnly(_ changed: [String], _ memory: inout RoutingMemory, context: BuildContext,
                             resolve: (String) -> HostResolution) -> RoutingBuild? {
        // First what each changed service becomes, changing nothing.
        var outcomes: [(name: String, entry: BuiltService?)] = []
        outcomes.reserveCapacity(changed.count)
        var claimed: [UInt16: String] = [:]
        for name in changed {
            let (index, found) = memory.search(name)
            let served = found ? memory.rows[index].served : nil
            guard let service = services[name], !service.instances.isEmpty else {
                // Empty: a frontend served before would linger.
                if served != nil && (services[name]?.config?.linger ?? options.linger) > 0 { return nil }
                outcomes.append((name, nil))
                continue
            }
            let entry = build(name, service, context: context, resolve: resolve)
            if !entry.hostNames.isEmpty { return nil }
            if let port = entry.frontend?.listen.port {
                if claimed.updateValue(name, forKey: port) != nil { return nil }
            }
            outcomes.append((name, entry))
        }
        // A port held by a service that is not changing stays its own (a changed holder
        // releases it; `changed` is sorted).
        for (port, name) in claimed {
            if let holder = memory.ports[port], holder != name, !changed.searchByName(holder, { $0 }).found { return nil }
        }
        // Then the change.
        var frontends = memory.lastFrontends
        memory.lastFrontends = []
        var applied: [String] = []
        var changedSet = Set<String>()
        for (name, entry) in outcomes {
            changedSet.insert(name)
            let (index, found) = memory.search(name)
            if let port = found ? memory.rows[index].served : nil, memory.ports[port] == name { memory.ports.removeValue(forKey: port) }
            memory.lastChecks.removeValue(forKey: name)
            let (position, listed) = frontends.searchByName(name) { $0.name }
            if services[name] == nil {
                // No key left: no row (a row gone with its frontend, as in the whole build).
                if found { memory.rows.remove(at: index) }
            } else if !found {
                memory.rows.insert(RoutingMemory.Row(name: name), at: index)
            }
            guard let entry, let frontend = entry.frontend else {
                // No instance (no linger), or no listen port: not served.
                if listed {
                    frontends.remove(at: position)
                    applied.append(name)
                }
                if services[name] != nil {
                    memory.rows[index].built = entry
                    memory.rows[index].served = nil
                    memory.rows[index].emptySince = nil
                }
                continue
            }
            memory.rows[index].built = entry
            memory.rows[index].served = frontend.listen.port
            memory.rows[index].emptySince = nil
            memory.ports[frontend.listen.port] = name
            if entry.hasCheck { memory.lastChecks[name] = entry.check }
            if listed {
                if frontends[position] != frontend {
                    frontends[position] = frontend
                    applied.append(name)
                }
            } else {
                frontends.insert(frontend, at: position)
                applied.append(name)
            }
        }
        var problems = memory.lastProblems.filter { !changedSet.contains($0.service) }
        for case (_, let entry?) in outcomes { problems += entry.problems }
        problems = Self.sortedByService(problems)
        memory.lastProblems = problems
        let table = memory.table(revision: revision, frontends: frontends, changed: applied)
        memory.builtByChanges += 1
        return RoutingBuild(table: table, checks: memory.lastChecks, problems: problems, lingering: [], nextEvaluation: nil, hostNames: [])
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
