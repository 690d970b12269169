import BerthEngine

/// One kind of load, run against one setup for a fixed time. Phases run in this order.
enum Phase: String, CaseIterable, Sendable {
    /// Small HTTP requests on keep-alive connections, closed loop.
    case keepAlive = "keepalive"
    /// One request per new connection (`Connection: close`), several in flight.
    case newConnections = "connect"
    /// One connection reading everything the bulk server sends.
    case bulkSingle = "bulk1"
    /// `BenchOptions.bulkStreams` such connections at once.
    case bulkMulti = "bulk4"
    /// Open loop at `BenchOptions.rate` requests per second; every response time recorded.
    case latency
    /// The same at 20,000 requests per second.
    case latencyHigh = "latency-20k"
    /// The same at 80% of the setup's saturation point: its keep-alive requests/s in this round
    /// (measured by a 1 s probe when the keepalive phase did not run).
    case latencyLoaded = "latency-80"
    /// `BenchOptions.crowdConnections` keep-alive connections, closed loop, every response time
    /// recorded: the tails at full load.
    case keepAliveCrowd = "keepalive-1000"

    /// The phases whose figure is a rate (the proxy's CPU tells who was the bottleneck).
    var isThroughput: Bool { !isOpenLoop }

    /// The open-loop phases: requests at a set rate, their figures response-time percentiles.
    var isOpenLoop: Bool { self == .latency || self == .latencyHigh || self == .latencyLoaded }

    /// The phase's name in a column header (at most 10 characters).
    var shortName: String {
        switch self {
        case .latencyHigh: "lat 20k"
        case .latencyLoaded: "lat 80%"
        case .keepAliveCrowd: "ka 1000"
        default: rawValue
        }
    }

    /// The phases that record every response time.
    var recordsLatency: Bool { isOpenLoop || self == .keepAliveCrowd }

    /// The phases that go to the bulk server (the others go to the whoami backends).
    var isBulk: Bool { self == .bulkSingle || self == .bulkMulti }
}

/// What the load goes through.
enum Setup: Hashable, Sendable {
    /// Straight to the backends.
    case direct
    /// Berth's engine in a child process, one worker, in the given relay mode.
    case berth(RelayMode)
    /// HAProxy, `mode tcp`, one thread, with or without `option splice-auto`.
    case haproxy(spliceAuto: Bool)
    /// The `berth` binary as an operator starts it: `berth proxy` with its defaults (two workers,
    /// relay auto), its stats server and TCP checks on, on both CPUs (shared with the load
    /// generator and backends). One frontend: the web backends.
    case berthDefault
    /// HAProxy's counterpart: `nbthread 2` on both CPUs, a stats listener, checks on its servers.
    case haproxyTwoThreads

    static let all: [Setup] = [
        .direct, .berth(.splice), .berth(.copy), .berth(.auto),
        .haproxy(spliceAuto: false), .haproxy(spliceAuto: true),
        .berthDefault, .haproxyTwoThreads,
    ]

    /// The name on the command line (`--setups`) and in the JSON output.
    var name: String {
        switch self {
        case .direct: "direct"
        case .berth(let mode): "berth-\(mode.rawValue)"
        case .haproxy(let spliceAuto): spliceAuto ? "haproxy-splice-auto" : "haproxy"
        case .berthDefault: "berth-default"
        case .haproxyTwoThreads: "haproxy-2t"
        }
    }

    /// The row label in the tables.
    var label: String {
        switch self {
        case .direct: "direct"
        case .berth(let mode): "berth \(mode.rawValue)"
        case .haproxy(let spliceAuto): spliceAuto ? "haproxy splice-auto" : "haproxy"
        case .berthDefault: "berth default"
        case .haproxyTwoThreads: "haproxy nbthread 2"
        }
    }

    var isProxy: Bool { self != .direct }

    var isBerth: Bool {
        switch self {
        case .berth, .berthDefault: true
        default: false
        }
    }

    var isHAProxy: Bool {
        switch self {
        case .haproxy, .haproxyTwoThreads: true
        default: false
        }
    }

    /// The proxy's threads: a Berth row is compared with the HAProxy rows of as many threads.
    var threads: Int { self == .berthDefault || self == .haproxyTwoThreads ? 2 : 1 }

    /// The CPUs the two-thread rows run on: both, shared with the load generator and backends.
    static let sharedCPUs = [0, 1]

    /// The CPUs the proxy runs on: `proxyCPU` alone, or `sharedCPUs` for the two-thread rows.
    func proxyCPUs(_ proxyCPU: Int) -> [Int] { threads > 1 ? Self.sharedCPUs : [proxyCPU] }

    /// `proxyCPUs` as taskset and the progress lines write it (`0,1`).
    func proxyCPUList(_ proxyCPU: Int) -> String { proxyCPUs(proxyCPU).map(String.init).joined(separator: ",") }

    /// The setups that serve one frontend only (no bulk phases).
    var servesBulk: Bool { self != .berthDefault }
}

/// Settings of a benchmark run (the command line without `--role`).
struct BenchOptions: Sendable {
    var quick = false
    var json = false
    var phases = Phase.allCases
    var setups = Setup.all
    /// Measured seconds per phase; nil: 5, or 1 with `--quick`.
    var seconds: Double?
    /// Requests per second of the latency phase.
    var rate = 2_000
    var keepAliveConnections = 32
    var concurrentConnects = 16
    var latencyConnections = 16
    /// Connections of the latency-20k and latency-80 phases (more than an open loop at those
    /// rates normally keeps busy).
    var loadedLatencyConnections = 32
    /// Connections of the keepalive-1000 phase.
    var crowdConnections = 1_000
    /// Requests per second of the latency-20k phase.
    static let highRate = 20_000
    /// Share of the saturation point the latency-80 phase asks for.
    static let loadedShare = 0.8
    var bulkStreams = 4
    /// HAProxy binary; nil: looked up in the usual places.
    var haproxyPath: String?
    /// A command the Berth proxy role runs under (a profiler), split on spaces.
    var proxyWrapper: [String] = []
    /// Rounds over all setups; each figure is taken from the least disturbed round.
    var rounds = 1
    /// The scenarios run after the phases (Scenarios.swift).
    var scenarios = Scenario.byDefault
    /// The fleet scenario's simulated hosts (`--fleet-hosts`; nil: 200, 20 with `--quick`).
    var fleetHosts: Int?
    /// The fleet scenario's services (`--fleet-services`; nil: 1,000, 100 with `--quick`).
    var fleetServices: Int?
    /// The hosts' `--relist-jitter` in ms (`--fleet-relist-jitter`; nil: berth's default).
    var fleetRelistJitter: Int?
    /// The fleet scenario's configurations (`--fleet-modes`; nil: direct, then grpc-proxy).
    var fleetModes: [String]?
    /// Where the fleet scenario copies its hosts' logs and revision logs (`--fleet-logs`).
    var fleetLogs: String?
    /// `namespaces` or `loopback` (`--fleet-network`; nil: namespaces where the bed can be built).
    var fleetNetwork: String?
    /// The `berth` executable the scenarios run; nil: the one built beside this bench.
    var berthPath: String?
    /// An older `berth` the features scenario also runs with its defaults (the "before" row).
    var berthBeforePath: String?

    var phaseSeconds: Double { seconds ?? (quick ? 1 : 5) }
    /// Load before each measured window (connections open, TCP windows grow); not counted.
    var warmupSeconds: Double { quick ? 0.2 : 0.5 }
}

/// What the command line asks for.
enum BenchCommand: Sendable {
    case help
    case benchmark(BenchOptions)
    case role(RoleOptions)
}

/// A command-line mistake, worded for the person who typed it.
struct UsageError: Error, CustomStringConvertible {
    let description: String
}

/// Parses the arguments (without the program name).
enum CommandLineParser {
    static func parse(_ arguments: [String]) throws(UsageError) -> BenchCommand {
        if arguments.contains("--role") { return .role(try parseRole(arguments)) }
        var options = BenchOptions()
        var reader = ArgumentReader(arguments)
        // nil: not named on the command line (then everything runs, unless the other list is named).
        var phases: [Phase]?
        var scenarios: [Scenario]?
        while let flag = reader.next() {
            switch flag {
            case "--help", "-h": return .help
            case "--quick": options.quick = true
            case "--json": options.json = true
            case "--phases":
                let (named, namedScenarios) = try parseSelection(try reader.value(for: flag), flag: flag, phasesAllowed: true)
                phases = (phases ?? []) + named
                scenarios = (scenarios ?? []) + namedScenarios
            case "--scenarios":
                let (_, named) = try parseSelection(try reader.value(for: flag), flag: flag, phasesAllowed: false)
                scenarios = (scenarios ?? []) + named
            case "--setups": options.setups = try parseSetups(try reader.value(for: flag))
            case "--seconds":
                let text = try reader.value(for: flag)
                guard let seconds = Double(text), seconds >= 0.1, seconds <= 600 else {
                    throw UsageError(description: "--seconds \(text): expected a number of seconds from 0.1 to 600")
                }
                options.seconds = seconds
            case "--rate": options.rate = try reader.integer(for: flag, in: 1...100_000, "requests per second")
            case "--repeat": options.rounds = try reader.integer(for: flag, in: 1...20, "a number of rounds")
            case "--haproxy": options.haproxyPath = try reader.value(for: flag)
            case "--berth": options.berthPath = try reader.value(for: flag)
            case "--berth-before": options.berthBeforePath = try reader.value(for: flag)
            case "--fleet-hosts": options.fleetHosts = try reader.integer(for: flag, in: 1...1_000, "a number of hosts")
            case "--fleet-services": options.fleetServices = try reader.integer(for: flag, in: 1...10_000, "a number of services")
            case "--fleet-relist-jitter": options.fleetRelistJitter = try reader.integer(for: flag, in: 0...60_000, "milliseconds")
            case "--fleet-modes":
                let modes = try reader.value(for: flag).split(separator: ",").map(String.init)
                guard !modes.isEmpty, modes.allSatisfy({ $0 == "direct" || $0 == "grpc-proxy" }) else {
                    throw UsageError(description: "--fleet-modes: expected direct, grpc-proxy or both, separated by commas")
                }
                options.fleetModes = modes
            case "--fleet-logs": options.fleetLogs = try reader.value(for: flag)
            case "--fleet-network":
                let value = try reader.value(for: flag)
                guard ["namespaces", "loopback"].contains(value) else {
                    throw UsageError(description: "--fleet-network: expected namespaces or loopback")
                }
                options.fleetNetwork = value
            case "--proxy-wrapper":
                options.proxyWrapper = try reader.value(for: flag).split(separator: " ").map(String.init)
                guard !options.proxyWrapper.isEmpty else { throw UsageError(description: "--proxy-wrapper needs a command") }
            default: throw UsageError(description: "unknown argument '\(flag)'")
            }
        }
        if phases != nil || scenarios != nil {
            let chosenPhases = Set(phases ?? [])
            let chosenScenarios = Set(scenarios ?? [])
            options.phases = Phase.allCases.filter { chosenPhases.contains($0) }
            options.scenarios = Scenario.allCases.filter { chosenScenarios.contains($0) }
            guard !options.phases.isEmpty || !options.scenarios.isEmpty else {
                throw UsageError(description: "--phases/--scenarios: name at least one phase or scenario")
            }
        }
        return .benchmark(options)
    }

    /// Phases and scenarios named in `text` (`bulk` stands for both bulk phases, `phases` for
    /// every phase, `scenarios` for every scenario).
    private static func parseSelection(_ text: String, flag: String, phasesAllowed: Bool) throws(UsageError) -> ([Phase], [Scenario]) {
        var phases: [Phase] = []
        var scenarios: [Scenario] = []
        for word in text.split(separator: ",") {
            if phasesAllowed && word == "phases" {
                phases += Phase.allCases
            } else if word == "scenarios" {
                scenarios += Scenario.byDefault
            } else if let scenario = Scenario(rawValue: String(word)) {
                scenarios.append(scenario)
            } else if phasesAllowed && word == "bulk" {
                phases += [.bulkSingle, .bulkMulti]
            } else if phasesAllowed, let phase = Phase(rawValue: String(word)) {
                phases.append(phase)
            } else {
                throw UsageError(description: "\(flag): unknown \(phasesAllowed ? "phase or scenario" : "scenario") '\(word)'")
            }
        }
        return (phases, scenarios)
    }

    private static func parseSetups(_ text: String) throws(UsageError) -> [Setup] {
        var chosen = Set<Setup>()
        for word in text.split(separator: ",") {
            let matches = Setup.all.filter { $0.name == word || (word == "berth" && $0.isBerth && $0 != .berthDefault) }
            guard !matches.isEmpty else { throw UsageError(description: "--setups: unknown setup '\(word)'") }
            chosen.formUnion(matches)
        }
        guard !chosen.isEmpty else { throw UsageError(description: "--setups: name at least one setup") }
        return Setup.all.filter { chosen.contains($0) }
    }
}

/// Walks the arguments; a flag's value is the argument after it.
struct ArgumentReader {
    private let arguments: [String]
    private var index = 0

    init(_ arguments: [String]) {
        self.arguments = arguments
    }

    mutating func next() -> String? {
        guard index < arguments.count else { return nil }
        defer { index += 1 }
        return arguments[index]
    }

    /// The next argument as a whole number in `range`; the error names the flag and `what`.
    mutating func integer(for flag: String, in range: ClosedRange<Int>, _ what: String) throws(UsageError) -> Int {
        let text = try value(for: flag)
        guard let number = Int(text), range.contains(number) else {
            throw UsageError(description: "\(flag) \(text): expected \(what) from \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }

    mutating func value(for flag: String) throws(UsageError) -> String {
        guard let value = next() else { throw UsageError(description: "\(flag) needs a value") }
        return value
    }
}
