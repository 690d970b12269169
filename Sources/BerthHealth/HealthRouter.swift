import BerthEngine
import BerthSystem
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
    /// Called after each table the engine accepted (`onPublish`).
    private let publishObserver = Mutex<(@Sendable (AppliedRouting) -> Void)?>(nil)
    /// Republishes while backends ramp up (slow start); its thread starts with the first ramp.
    private let rampTimer = RampTimer()

    private struct State {
        var desired = RoutingTable()
        /// Per-frontend check settings that replace the policy's (discovery's `_config`).
        var checkOverrides: [String: CheckSettings] = [:]
        /// Backends with an active check now, by frontend: the others take traffic whatever the
        /// checker says.
        var checked: [String: Set<String>] = [:]
        var allDownEvents: [String: UInt64] = [:]
        var allDownNow: Set<String> = []
        /// Operator overrides (drain, maint); `ready` is stored as no entry. Pruned to the
        /// backends of the desired table on every `apply`.
        var adminStates: [BackendKey: AdminState] = [:]
        /// Health to start new check targets in (`seed`), used by the next `updateChecks` only.
        var seededHealth: [BackendKey: HealthStatus] = [:]
        /// Operator weights (HAProxy's `set server weight`), in place of the table's; pruned
        /// like `adminStates`.
        var weightOverrides: [BackendKey: Int] = [:]
        /// Slow start: when each ramping backend came up (monotonic ms); dropped at full weight.
        var upSince: [BackendKey: Int64] = [:]
        /// Each frontend as last published (in the desired table's order), with the desired
        /// frontend it was made from: reused while that frontend is unchanged and `stale` is
        /// false, so that a table change costs the frontends it changed, not the whole table (a
        /// fleet host sees every change). Slow start reads it too: a backend ramps when it
        /// starts taking traffic in a frontend published before (the first table of a frontend,
        /// at start for instance, is served at full weight).
        var published: [PublishedFrontend] = []
        /// `published`'s effective frontends, the table last given to the engine.
        var effective: [Frontend] = []
        /// The serial of the desired table `published` was made from (0: none): a desired table
        /// with changes relative to it is published by those alone.
        var publishedFrom: UInt64 = 0
        /// The serial of the effective table the engine last accepted.
        var effectiveSerial: UInt64 = 0
        /// Set when health, overrides, check settings or a ramp changed: every frontend is
        /// made again at the next publish.
        var stale = true

        /// The names to publish the desired table by (its changes, when `published` was made
        /// from their base and nothing is stale); nil: every frontend.
        var changesToApply: [String]? {
            guard !stale, publishedFrom != 0, let changes = desired.changes, changes.base == publishedFrom else { return nil }
            return changes.names
        }
    }

    private struct PublishedFrontend {
        var desired: Frontend
        var effective: Frontend
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

    /// Sets the desired table: every backend in it is checked, and those that take traffic are
    /// applied to the engine.
    @discardableResult
    public func apply(_ table: RoutingTable, checks overrides: [String: CheckSettings] = [:]) throws(EngineError) -> Engine.ApplyResult {
        try state.withLock { state throws(EngineError) -> Engine.ApplyResult in
            state.desired = table
            if state.checkOverrides != overrides { state.stale = true }
            state.checkOverrides = overrides
            let changes = state.changesToApply
            if !state.adminStates.isEmpty || !state.weightOverrides.isEmpty {
                // Kept for the backends still in the table (with changes, only the changed
                // frontends' overrides are looked at).
                let changed = changes.map(Set.init)
                let present = Set(table.frontends.lazy.filter { changed?.contains($0.name) ?? true }.flatMap { frontend in
                    frontend.backends.map { BackendKey(frontend: frontend.name, backend: $0.name) }
                })
                let keep: (BackendKey) -> Bool = { key in
                    guard let changed, !changed.contains(key.frontend) else { return present.contains(key) }
                    return true
                }
                state.adminStates = state.adminStates.filter { keep($0.key) }
                state.weightOverrides = state.weightOverrides.filter { keep($0.key) }
            }
            if let changes { updateChecks(&state, of: changes) } else { updateChecks(&state) }
            return try publish(&state)
        }
    }

    /// `updateChecks` for the frontends named only (a desired table applied by its changes):
    /// the checker is told the difference.
    private func updateChecks(_ state: inout State, of names: [String]) {
        guard let checker, checksInPlay(state) else { return }
        guard state.seededHealth.isEmpty else { return updateChecks(&state) }
        var removed: [BackendKey] = []
        var targets: [CheckTarget] = []
        for name in names {
            let (index, found) = state.desired.search(name)
            let now = found ? checkTargets(of: state.desired.frontends[index], state) : []
            let checked = Set(now.map(\.key.backend))
            for backend in state.checked[name] ?? [] where !checked.contains(backend) {
                removed.append(BackendKey(frontend: name, backend: backend))
            }
            state.checked[name] = checked.isEmpty ? nil : checked
            targets += now
        }
        checker.update(removing: removed, setting: targets)
    }

    /// Whether the checker has anything to be told: something checked before or now.
    private func checksInPlay(_ state: State) -> Bool {
        policy.checks != nil || !state.checkOverrides.isEmpty || !state.checked.isEmpty || !state.seededHealth.isEmpty
    }

    /// What the checker checks of `frontend`: every backend but those in maintenance, with the
    /// frontend's check settings (none without any), starting as seeded or as the policy says.
    private func checkTargets(of frontend: Frontend, _ state: State) -> [CheckTarget] {
        guard let checks = state.checkOverrides[frontend.name] ?? policy.checks else { return [] }
        var targets: [CheckTarget] = []
        for backend in frontend.backends {
            let key = BackendKey(frontend: frontend.name, backend: backend.name)
            if state.adminStates[key] == .maint { continue }
            let initial = state.seededHealth[key].map { $0 == .down ? NewBackendState.down : .up } ?? policy.newBackendState
            targets.append(CheckTarget(key: key, address: backend.address, settings: checks, initialState: initial))
        }
        return targets
    }

    /// Gives the checker every backend of the desired table but those in maintenance. Called
    /// under the state lock, so the checker's targets follow the tables' order (the checker's
    /// own thread takes this lock only after releasing its records, so the order is safe).
    private func updateChecks(_ state: inout State) {
        // Nothing checked, before or now: nothing to tell the checker.
        guard let checker, checksInPlay(state) else { return }
        var targets: [CheckTarget] = []
        var checked: [String: Set<String>] = [:]
        for frontend in state.desired.frontends {
            let made = checkTargets(of: frontend, state)
            if !made.isEmpty { checked[frontend.name] = Set(made.map(\.key.backend)) }
            targets += made
        }
        state.seededHealth = [:]
        state.checked = checked
        checker.update(targets)
    }

    /// Sets an operator override (HAProxy's `set server state`): `drain` and `maint` take the
    /// backend out of new connections at once while its open connections continue; `ready`
    /// gives it back to health. Throws for a backend not in the desired table.
    public func setAdminState(_ admin: AdminState, for key: BackendKey) throws(AdminError) {
        try state.withLock { state throws(AdminError) in
            let known = state.desired.frontends.contains { frontend in
                frontend.name == key.frontend && frontend.backends.contains { $0.name == key.backend }
            }
            guard known else { throw AdminError.unknownBackend(key) }
            let previous = state.adminStates[key] ?? .ready
            state.adminStates[key] = admin == .ready ? nil : admin
            state.stale = true
            if (previous == .maint) != (admin == .maint) { updateChecks(&state) }
            do throws(EngineError) {
                _ = try publish(&state)
            } catch {
                throw AdminError.engine(error.description)
            }
        }
    }

    /// Sets an operator weight (HAProxy's `set server weight`), 0 to 256, in place of the
    /// table's until the backend leaves it; nil goes back to the table's weight. Open
    /// connections are not touched; weight 0 takes no new ones.
    public func setWeight(_ weight: Int?, for key: BackendKey) throws(AdminError) {
        if let weight, !(0...256).contains(weight) { throw AdminError.badWeight(weight) }
        try state.withLock { state throws(AdminError) in
            let known = state.desired.frontends.contains { frontend in
                frontend.name == key.frontend && frontend.backends.contains { $0.name == key.backend }
            }
            guard known else { throw AdminError.unknownBackend(key) }
            state.weightOverrides[key] = weight
            state.stale = true
            do throws(EngineError) {
                _ = try publish(&state)
            } catch {
                throw AdminError.engine(error.description)
            }
        }
    }

    /// Seeds the next `apply` (a table restored from a state file): its backends start in these
    /// health states (checks then run and decide) and with these operator overrides.
    public func seed(health: [BackendKey: HealthStatus], adminStates: [BackendKey: AdminState],
                     weights: [BackendKey: Int] = [:]) {
        state.withLock { state in
            state.seededHealth = health
            state.adminStates = adminStates.filter { $0.value != .ready }
            state.weightOverrides = weights.filter { (0...256).contains($0.value) }
            state.stale = true
        }
    }

    /// Each backend's balancing weight as last published: the operator's or the table's, and
    /// its slow-start warmup.
    public func weights() -> [BackendKey: WeightInForce] {
        state.withLock { state in
            var weights: [BackendKey: WeightInForce] = [:]
            for frontend in state.published.map(\.effective) {
                for backend in frontend.backends {
                    let key = BackendKey(frontend: frontend.name, backend: backend.name)
                    weights[key] = WeightInForce(weight: backend.weight, warmup: backend.warmup,
                                                 overridden: state.weightOverrides[key] != nil)
                }
            }
            return weights
        }
    }

    /// Calls `observer` after each table the engine accepted, with the desired table, health and
    /// overrides it came from. It runs under the router's lock, on the control plane's or the
    /// checker's thread: it must only hand the value on (never call back into the router).
    public func onPublish(_ observer: @escaping @Sendable (AppliedRouting) -> Void) {
        publishObserver.withLock { $0 = observer }
    }

    /// Operator overrides now in force (backends without one are `ready`).
    public func adminStates() -> [BackendKey: AdminState] {
        state.withLock { $0.adminStates }
    }

    /// The table last given to `apply`, before health and overrides.
    public func desiredTable() -> RoutingTable {
        state.withLock { $0.desired }
    }

    /// Health of every backend (empty without checks).
    public func health() -> [BackendKey: BackendHealth] {
        checker?.health() ?? [:]
    }

    /// Times each frontend had every backend down.
    public func allDownEvents() -> [String: UInt64] {
        state.withLock { $0.allDownEvents }
    }

    /// A router dropped without `shutdown` must not leave its slow-start thread waiting.
    deinit {
        rampTimer.stop()
    }

    /// Stops checks and the engine (draining for up to `drainTimeout` ms).
    public func shutdown(drainTimeout: Int64? = nil) {
        rampTimer.stop()
        checker?.stop()
        engine.shutdown(drainTimeout: drainTimeout)
    }

    /// After a health change or a ramp step: every frontend is made again.
    private func republish() {
        state.withLock { state in
            state.stale = true
            _ = try? publish(&state)
        }
    }

    /// The table of backends that take traffic; with none up, the all-down policy decides.
    /// Frontends unchanged since the last publish (and nothing `stale`) are reused as they were.
    private func publish(_ state: inout State) throws(EngineError) -> Engine.ApplyResult {
        let health = checker?.health() ?? [:]
        let now = MonotonicClock.milliseconds()
        if let names = state.changesToApply {
            return try publishChanges(names, health: health, now: now, &state)
        }
        var effective = RoutingTable(revision: state.desired.revision, frontends: [])
        // (Kept out of the state until the engine accepts: refused, the next publish makes
        // everything again.)
        state.publishedFrom = 0
        effective.frontends.reserveCapacity(state.desired.frontends.count)
        var published: [PublishedFrontend] = []
        published.reserveCapacity(state.desired.frontends.count)
        var matcher = NameMatcher(previous: state.published.map(\.desired.name))
        var nextStep: Int64?
        for frontend in state.desired.frontends {
            let position = matcher.position(of: frontend.name)
            if !state.stale, let position, state.published[position].desired == frontend {
                effective.frontends.append(state.published[position].effective)
                published.append(state.published[position])
                continue
            }
            var made = frontend
            applyHealth(&made, health: health, &state)
            let before = position.map { state.published[$0].effective }
            if let step = applyWeights(&made, before: before, now: now, &state) { nextStep = min(nextStep ?? step, step) }
            effective.frontends.append(made)
            published.append(PublishedFrontend(desired: frontend, effective: made))
        }
        if !matcher.matchedAll {
            let present = Set(published.map(\.desired.name))
            state.upSince = state.upSince.filter { present.contains($0.key.frontend) }
        }
        effective.serial = RoutingTable.makeSerial()
        let result = try engine.apply(effective)
        state.published = published
        state.effective = effective.frontends
        state.publishedFrom = state.desired.serial
        state.effectiveSerial = effective.serial
        state.stale = false
        afterPublish(nextStep: nextStep, health: health, state)
        return result
    }

    /// `publish` of a desired table by its changes: only the frontends named are made again;
    /// the engine gets the effective frontends that changed. Refused by the engine: the next
    /// publish makes everything again.
    private func publishChanges(_ names: [String], health: [BackendKey: BackendHealth], now: Int64,
                                _ state: inout State) throws(EngineError) -> Engine.ApplyResult {
        // Taken out, to change in place.
        var published = state.published
        var effective = state.effective
        state.published = []
        state.effective = []
        state.publishedFrom = 0
        var applied: [String] = []
        var nextStep: Int64?
        for name in names {
            let (index, found) = state.desired.search(name)
            let (position, held) = published.searchByName(name) { $0.desired.name }
            guard found else {
                guard held else { continue }
                published.remove(at: position)
                effective.remove(at: position)
                if !state.upSince.isEmpty { state.upSince = state.upSince.filter { $0.key.frontend != name } }
                applied.append(name)
                continue
            }
            let frontend = state.desired.frontends[index]
            if held && published[position].desired == frontend { continue }
            var made = frontend
            applyHealth(&made, health: health, &state)
            if let step = applyWeights(&made, before: held ? effective[position] : nil, now: now, &state) {
                nextStep = min(nextStep ?? step, step)
            }
            if held {
                published[position] = PublishedFrontend(desired: frontend, effective: made)
                effective[position] = made
            } else {
                published.insert(PublishedFrontend(desired: frontend, effective: made), at: position)
                effective.insert(made, at: position)
            }
            applied.append(name)
        }
        let table = RoutingTable(revision: state.desired.revision, frontends: effective, serial: RoutingTable.makeSerial(),
                                 changes: FrontendChanges(base: state.effectiveSerial, names: applied))
        let result = try engine.apply(table)
        state.published = published
        state.effective = effective
        state.publishedFrom = state.desired.serial
        state.effectiveSerial = table.serial
        afterPublish(nextStep: nextStep, health: health, state)
        return result
    }

    /// After a table the engine accepted: the next ramp step, the observer.
    private func afterPublish(nextStep: Int64?, health: [BackendKey: BackendHealth], _ state: State) {
        if let nextStep { rampTimer.schedule(at: nextStep) { [weak self] in self?.republish() } }
        if let observer = publishObserver.withLock({ $0 }) {
            observer(AppliedRouting(desired: state.desired, health: health.mapValues(\.status), adminStates: state.adminStates,
                                    weights: state.weightOverrides))
        }
    }

    /// Disables the backends of `frontend` that are down, drained or in maintenance; with none
    /// left up, the all-down policy decides.
    private func applyHealth(_ frontend: inout Frontend, health: [BackendKey: BackendHealth], _ state: inout State) {
        guard checker != nil || !state.adminStates.isEmpty, !frontend.backends.isEmpty else { return }
        let desired = frontend
        // Down, drained and maintained backends stay in the table, disabled: no new
        // connections, and their open connections run on (a removed backend would be drained).
        var overridden = Set<Int>()
        for backendIndex in desired.backends.indices {
            let backend = desired.backends[backendIndex]
            let key = BackendKey(frontend: desired.name, backend: backend.name)
            if state.adminStates[key] != nil { overridden.insert(backendIndex) }
            let healthy = state.checked[key.frontend]?.contains(key.backend) != true
                || (health[key]?.takesTraffic ?? (policy.newBackendState == .up))
            frontend.backends[backendIndex].enabled = backend.enabled && healthy && !overridden.contains(backendIndex)
        }
        if frontend.backends.contains(where: \.enabled) {
            state.allDownNow.remove(desired.name)
            return
        }
        if !state.allDownNow.contains(desired.name) {
            state.allDownNow.insert(desired.name)
            state.allDownEvents[desired.name, default: 0] += 1
        }
        // Panic routing overrides health, never an operator: drained and maintained
        // backends stay out.
        if policy.allDown == .tryAll {
            frontend.settings.panic = true
            for backendIndex in desired.backends.indices {
                frontend.backends[backendIndex].enabled = desired.backends[backendIndex].enabled && !overridden.contains(backendIndex)
            }
        }
    }

    /// Puts the operators' weights and the slow-start warmups into `frontend` (whose `enabled`
    /// flags are final); returns when its next ramp step is due, nil when nothing ramps.
    /// `before`: the frontend as last published (nil: new), whose enabled backends were taking
    /// traffic.
    private func applyWeights(_ frontend: inout Frontend, before: Frontend?, now: Int64, _ state: inout State) -> Int64? {
        let slowStart = frontend.settings.slowStart
        guard !state.weightOverrides.isEmpty || slowStart > 0 || !state.upSince.isEmpty else { return nil }
        let wasTaking = slowStart > 0 ? Set(before?.backends.lazy.filter(\.enabled).map(\.name) ?? []) : []
        var nextStep: Int64?
        for backendIndex in frontend.backends.indices {
            let backend = frontend.backends[backendIndex]
            let key = BackendKey(frontend: frontend.name, backend: backend.name)
            if let weight = state.weightOverrides[key] { frontend.backends[backendIndex].weight = weight }
            guard backend.enabled else {
                state.upSince[key] = nil
                continue
            }
            guard slowStart > 0 else {
                state.upSince[key] = nil
                continue
            }
            if before != nil && !wasTaking.contains(backend.name) && state.upSince[key] == nil { state.upSince[key] = now }
            guard let since = state.upSince[key] else { continue }
            let warmup = SlowStart.warmup(elapsed: now - since, over: slowStart)
            if warmup >= Backend.fullWarmup {
                state.upSince[key] = nil
            } else {
                frontend.backends[backendIndex].warmup = warmup
                let due = now + SlowStart.step(slowStart)
                nextStep = min(nextStep ?? due, due)
            }
        }
        return nextStep
    }
}

/// A table the router applied, as `HealthRouter.onPublish` reports it.
public struct AppliedRouting: Sendable, Equatable {
    /// The table before health and overrides (what discovery asked for).
    public var desired: RoutingTable
    public var health: [BackendKey: HealthStatus]
    public var adminStates: [BackendKey: AdminState]
    /// Operator weights in force (`HealthRouter.setWeight`).
    public var weights: [BackendKey: Int] = [:]
}

/// A backend's balancing weight as published (`HealthRouter.weights`).
public struct WeightInForce: Sendable, Equatable {
    /// The operator's weight when `overridden`, else the table's.
    public var weight: Int
    /// Slow start: thousandths of `weight` in force (`Backend.fullWarmup`: all of it).
    public var warmup: Int
    public var overridden: Bool

    public init(weight: Int, warmup: Int = Backend.fullWarmup, overridden: Bool = false) {
        self.weight = weight
        self.warmup = warmup
        self.overridden = overridden
    }
}

/// Slow start's ramp (HAProxy's `slowstart`): linear from a thousandth of the weight to all of
/// it over the period, republished in steps. Pure.
public enum SlowStart {
    /// Thousandths of its weight a backend up for `elapsed` ms has (at least 1).
    public static func warmup(elapsed: Int64, over period: Int64) -> Int {
        guard period > 0, elapsed < period else { return Backend.fullWarmup }
        return max(1, Int(max(0, elapsed) * Int64(Backend.fullWarmup) / period))
    }

    /// Time between republished steps: a tenth of the period, at least 100 ms.
    public static func step(_ period: Int64) -> Int64 { max(100, period / 10) }
}

/// Calls a function once a deadline passes, on a thread of its own started with the first
/// deadline (processes without slow start never start it).
final class RampTimer: @unchecked Sendable {
    /// Guards the fields below it.
    private let condition = ConditionLock()
    private var deadline = Int64.max
    private var started = false
    private var stopped = false

    /// Fires `action` at `time` (monotonic ms), or earlier when an earlier time is pending. The
    /// action is fixed by the first call.
    func schedule(at time: Int64, _ action: @escaping @Sendable () -> Void) {
        let start: Bool = condition.withLock {
            guard !stopped else { return false }
            deadline = min(deadline, time)
            defer { started = true }
            return !started
        }
        if start {
            _ = OSThread(name: "berth-slowstart") { [self] in run(action) }
        } else {
            condition.signal()
        }
    }

    func stop() {
        condition.withLock { stopped = true }
        condition.signal()
    }

    private func run(_ action: @Sendable () -> Void) {
        condition.lock()
        while !stopped {
            let left = deadline == .max ? Int64.max : deadline - MonotonicClock.milliseconds()
            if left == .max {
                condition.wait()
            } else if left > 0 {
                _ = condition.wait(milliseconds: left)
            } else {
                deadline = .max
                condition.unlock()
                action()
                condition.lock()
            }
        }
        condition.unlock()
    }
}
