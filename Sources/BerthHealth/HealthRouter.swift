import BerthEngine
import Synchronization

/// Health policy for the whole process, as the command line sets it.
public struct HealthPolicy: Sendable, Equatable {
    /// nil: no active checks (every backend takes traffic; connect failures are still retried).
    public var checks: CheckSettings?
    public var newBackendState: NewBackendState = .up
    public var allDown: AllDownPolicy = .reject

    public init(checks: CheckSettings? = nil, newBackendState: NewBackendState = .up, allDown: AllDownPolicy = .reject) {
        self.checks = checks
        self.newBackendState = newBackendState
        self.allDown = allDown
    }
}

/// Sits between whoever decides the backends (the command line now, etcd discovery later) and
/// the engine: it keeps the desired table, has every backend checked, and applies to the engine
/// the table of backends that are up. Changes flow one way: desired table or health → engine.
///
/// Threads: `apply` from the control plane; republishing also happens on the checker's thread
/// when a status changes. Both go through one lock, so the engine sees tables in order.
public final class HealthRouter: Sendable {
    public let engine: Engine
    public let checker: HealthChecker?
    public let policy: HealthPolicy
    private let state = Mutex<State>(State())

    private struct State {
        var desired = RoutingTable()
        /// Backends with an active check: the others take traffic whatever the checker says.
        var checked: Set<BackendKey> = []
        var lastApplied: RoutingTable?
        var allDownEvents: [String: UInt64] = [:]
        var allDownNow: Set<String> = []
    }

    /// `checker` must be the one the engine's `backendFailed` reports to (see `makeEngine`).
    public init(engine: Engine, checker: HealthChecker?, policy: HealthPolicy) {
        self.engine = engine
        self.checker = checker
        self.policy = policy
        checker?.onChange { [weak self] in self?.republish() }
    }

    /// Creates a checker (when the policy has checks, or `alwaysCheck`: discovery, whose services
    /// may bring their own check settings) and an engine whose passive observation reports to
    /// it, and the router over both.
    public static func make(configuration: EngineConfiguration, policy: HealthPolicy, alwaysCheck: Bool = false) throws(SystemError) -> HealthRouter {
        var configuration = configuration
        var checker: HealthChecker?
        if policy.checks != nil || alwaysCheck {
            let created = try HealthChecker()
            checker = created
            configuration.backendFailed = { frontend, backend in
                created.reportFailure(BackendKey(frontend: frontend, backend: backend))
            }
        } else {
            configuration.observeErrors = 0
        }
        let engine = try Engine(configuration: configuration)
        return HealthRouter(engine: engine, checker: checker, policy: policy)
    }

    /// Sets the desired table: every backend in it is checked (with its frontend's settings in
    /// `checks`, else the policy's), and those that take traffic are applied to the engine.
    @discardableResult
    public func apply(_ table: RoutingTable, checks overrides: [String: CheckSettings] = [:]) throws(EngineError) -> Engine.ApplyResult {
        var checked: Set<BackendKey> = []
        if let checker {
            var targets: [CheckTarget] = []
            for frontend in table.frontends {
                guard let checks = overrides[frontend.name] ?? policy.checks else { continue }
                for backend in frontend.backends {
                    checked.insert(BackendKey(frontend: frontend.name, backend: backend.name))
                    targets.append(CheckTarget(
                        key: BackendKey(frontend: frontend.name, backend: backend.name),
                        address: backend.address, settings: checks, initialState: policy.newBackendState))
                }
            }
            checker.update(targets)
        }
        return try state.withLock { state throws(EngineError) -> Engine.ApplyResult in
            state.desired = table
            state.checked = checked
            return try publish(&state)
        }
    }

    /// Health of every backend (empty without checks).
    public func health() -> [BackendKey: BackendHealth] {
        checker?.health() ?? [:]
    }

    /// Times each frontend had every backend down.
    public func allDownEvents() -> [String: UInt64] {
        state.withLock { $0.allDownEvents }
    }

    /// Stops checks and the engine (draining for up to `drainTimeout` ms).
    public func shutdown(drainTimeout: Int64? = nil) {
        checker?.stop()
        engine.shutdown(drainTimeout: drainTimeout)
    }

    private func republish() {
        state.withLock { state in _ = try? publish(&state) }
    }

    /// The table of backends that take traffic; with none up, the all-down policy decides.
    private func publish(_ state: inout State) throws(EngineError) -> Engine.ApplyResult {
        let health = checker?.health() ?? [:]
        var effective = state.desired
        for index in effective.frontends.indices {
            let frontend = effective.frontends[index]
            guard checker != nil, !frontend.backends.isEmpty else { continue }
            // Down backends stay in the table, disabled: no new connections, and their open
            // connections run on (a removed backend would be drained).
            for backendIndex in frontend.backends.indices {
                let backend = frontend.backends[backendIndex]
                let key = BackendKey(frontend: frontend.name, backend: backend.name)
                guard state.checked.contains(key) else { continue }
                effective.frontends[index].backends[backendIndex].enabled = backend.enabled
                    && (health[key]?.takesTraffic ?? (policy.newBackendState == .up))
            }
            let up = effective.frontends[index].backends.filter(\.enabled)
            if up.isEmpty {
                if !state.allDownNow.contains(frontend.name) {
                    state.allDownNow.insert(frontend.name)
                    state.allDownEvents[frontend.name, default: 0] += 1
                }
                if policy.allDown == .tryAll {
                    effective.frontends[index].settings.panic = true
                    for backendIndex in frontend.backends.indices {
                        effective.frontends[index].backends[backendIndex].enabled = frontend.backends[backendIndex].enabled
                    }
                }
            } else {
                state.allDownNow.remove(frontend.name)
            }
        }
        let result = try engine.apply(effective)
        state.lastApplied = effective
        return result
    }
}
