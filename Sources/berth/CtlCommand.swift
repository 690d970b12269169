import ArgumentParser
import BerthEngine
import BerthRegistry
import BerthSystem
import BerthStats
import FoundationEssentials

/// `berth ctl`: talks to a running berth's stats server (its admin API and /stats.json).
struct CtlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ctl",
        abstract: "Drain, enable, maintain or weigh a backend of a running berth, or list its backends.",
        discussion: """
            Calls the admin API of the stats server (started with --stats-auth USER:PASS): \
            drain (no new connections, open ones continue), maint (the same, and its checks pause), \
            enable (back to what its health checks say), weight (its share of new connections, as \
            HAProxy's set server weight). Exit status 1 when the server refuses.
            """,
        subcommands: [Drain.self, Enable.self, Maint.self, Weight.self, List.self])

    static let environment = EnvironmentFlags(command: "ctl", flags: [
        ("--stats", "BERTH_STATS"), ("--auth", "BERTH_STATS_AUTH"),
    ])

    struct Drain: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "No new connections to BACKEND; open ones continue.")
        @OptionGroup var backend: CtlBackend
        func run() throws { try backend.apply("drain") }
    }

    struct Enable: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Give BACKEND back to its health checks (ends drain or maint).")
        @OptionGroup var backend: CtlBackend
        func run() throws { try backend.apply("enable") }
    }

    struct Maint: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Maintenance: no new connections, checks paused.")
        @OptionGroup var backend: CtlBackend
        func run() throws { try backend.apply("maint") }
    }

    struct Weight: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Set BACKEND's balancing weight (0 to 256; 0: no new connections), or reset it to the registry's.",
            discussion: """
                The weight holds while the backend stays in the service (a restart without \
                --state-file, or its removal from the registry, ends it); open connections are not touched. reset goes back to the \
                weight the registry or --backend gave.
                """)
        @OptionGroup var backend: CtlBackend
        @Argument(help: "0 to 256, or reset.") var weight: String

        /// The weight asked for; nil for reset.
        var value: Int? { Int(weight) }

        func validate() throws {
            guard weight == "reset" || (weight.allSatisfy(\.isNumber) && value.map { (0...256).contains($0) } == true) else {
                throw ValidationError("invalid weight '\(weight.prefix(16))': a number from 0 to 256, or reset")
            }
        }

        func run() throws {
            let path = "/admin/backends/\(CtlTarget.escape(backend.service))/\(CtlTarget.escape(backend.backend))/weight/\(weight)"
            _ = try backend.target.request("POST", path)
            print("\(backend.service)/\(backend.backend): " + (value.map { "weight \($0)" } ?? "weight reset to the registry's"))
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print every service and backend with its status.")
        @OptionGroup var target: CtlTarget

        func run() throws {
            let response = try target.request("GET", "/stats.json")
            let snapshot: StatsSnapshot
            do {
                snapshot = try JSONDecoder().decode(StatsSnapshot.self, from: Data(response.body.utf8))
            } catch {
                throw CtlFailure(description: "unexpected answer from \(target.stats): \(error)")
            }
            var rows = [["SERVICE", "BACKEND", "ADDRESS", "STATUS", "WEIGHT", "CHECK", "CUR", "TOTAL", "LAST"]]
            for service in snapshot.services {
                for backend in service.backends {
                    let check = backend.check.map { check in
                        check.code + (check.durationMilliseconds.map { " \($0)ms" } ?? "")
                    } ?? "-"
                    let last = backend.traffic.lastSessionSeconds.map { "\(Int($0))s" } ?? "-"
                    rows.append([service.name, backend.name, backend.address, backend.status.rawValue,
                                 backend.weightText, check,
                                 String(backend.traffic.currentSessions), String(backend.traffic.totalSessions), last])
                }
            }
            print(Self.aligned(rows), terminator: "")
        }

        /// Columns padded to their widest cell, two spaces apart.
        static func aligned(_ rows: [[String]]) -> String {
            guard let first = rows.first else { return "" }
            let widths = first.indices.map { column in rows.map { $0[column].count }.max() ?? 0 }
            return rows.map { row in
                row.enumerated().map { column, cell in
                    column == row.count - 1 ? cell : cell + String(repeating: " ", count: max(0, widths[column] - cell.count))
                }.joined(separator: "  ")
            }.joined(separator: "\n") + "\n"
        }
    }
}

/// The arguments of drain, enable and maint: which backend, on which server.
struct CtlBackend: ParsableArguments {
    @OptionGroup var target: CtlTarget
    @Argument(help: "The service (frontend) name.") var service: String
    @Argument(help: "The backend name (as the stats page shows it).") var backend: String

    func apply(_ action: String) throws { try target.admin(action, service: service, backend: backend) }
}

/// Where the stats server is and how to log in; shared by every `ctl` subcommand.
struct CtlTarget: ParsableArguments {
    @Option(help: EnvironmentFlags.help("The stats server: http://HOST:PORT or HOST:PORT (the --stats of the berth to control).", "BERTH_STATS"))
    var stats: String = "http://127.0.0.1:1936"

    @Option(help: EnvironmentFlags.help("USER:PASS, as given to that berth's --stats-auth.", "BERTH_STATS_AUTH"))
    var auth: String?

    func validate() throws {
        if stats == "off" { throw ValidationError("the stats server is off (--stats off): nothing to control") }
        do {
            _ = try StatsClient.Target(parsing: stats)
        } catch {
            throw ValidationError("\(error)")
        }
        if let auth, StatsCredentials(auth) == nil {
            throw ValidationError("invalid value for --auth: expected USER:PASS with both parts non-empty")
        }
    }

    func request(_ method: String, _ path: String) throws -> StatsClient.Response {
        let target = try StatsClient.Target(parsing: stats)
        let response: StatsClient.Response
        do {
            response = try StatsClient.request(method, path, to: target,
                                               authorization: auth.flatMap(StatsCredentials.init)?.headerValue)
        } catch {
            throw CtlFailure(description: "\(error)")
        }
        switch response.status {
        case 200: return response
        case 401: throw CtlFailure(description: auth == nil ? "authentication required: give --auth USER:PASS" : "wrong credentials (--auth)")
        default:
            let message = Self.message(response.body)
            throw CtlFailure(description: "\(stats) answered \(response.status): \(message)")
        }
    }

    func admin(_ action: String, service: String, backend: String) throws {
        let path = "/admin/backends/\(Self.escape(service))/\(Self.escape(backend))/\(action)"
        _ = try request("POST", path)
        print("\(service)/\(backend): \(action == "enable" ? "enabled" : action == "drain" ? "draining" : "in maintenance")")
    }

    /// The `error` of a JSON answer, or the text itself on one line.
    private static func message(_ body: String) -> String {
        struct ErrorAnswer: Decodable { let error: String }
        if let answer = try? JSONDecoder().decode(ErrorAnswer.self, from: Data(body.utf8)) { return answer.error }
        return body.split(separator: "\n").first.map(String.init) ?? ""
    }

    /// Percent-encodes a path segment (backend names such as `127.0.0.1:8001` pass as they are).
    static func escape(_ segment: String) -> String {
        PercentEncoding.encode(segment, keeping: PercentEncoding.pathSegmentExtras)
    }
}

struct CtlFailure: Error, CustomStringConvertible {
    let description: String
}
