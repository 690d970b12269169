import ArgumentParser
import BerthSystem
import BerthStats

/// The stats server's flags, shared by every long-running command (`proxy`; later `discover`,
/// `run`, `dev`): add `@OptionGroup var stats: StatsOptions`, its `environment` to the command's,
/// and call `start(provider:)` once the data plane runs.
struct StatsOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [
        ("--stats", "BERTH_STATS"), ("--stats-auth", "BERTH_STATS_AUTH"),
    ]
    static let defaultAddress = "0.0.0.0:1936"

    @Option(help: EnvironmentFlags.help("Stats page, CSV, JSON, /metrics and admin API on HOST:PORT, or off (default: \(defaultAddress)).", "BERTH_STATS"))
    var stats: String?

    @Option(help: EnvironmentFlags.help("USER:PASS for HTTP basic auth on every stats page but /healthz; also enables the admin API (drain, enable, maint).", "BERTH_STATS_AUTH"))
    var statsAuth: String?

    func validate() throws {
        if let stats, stats != "off" {
            do {
                _ = try SocketAddress(parsing: stats.trimmed)
            } catch {
                throw invalid("--stats", stats, "HOST:PORT or off")
            }
        }
        if let statsAuth, StatsCredentials(statsAuth) == nil {
            throw ValidationError("invalid value for --stats-auth: expected USER:PASS with both parts non-empty")
        }
    }

    /// nil: off.
    var address: SocketAddress? {
        let text = (stats ?? Self.defaultAddress).trimmed
        return text == "off" ? nil : try? SocketAddress(parsing: text)
    }

    /// Starts the stats server unless `--stats off`. An address given explicitly must bind (the
    /// error is fatal); the default one may be taken (another berth on this host): then a
    /// warning, and the proxy runs without stats.
    func start(provider: StatsProvider, reusePort: Bool = false) throws -> StatsServer? {
        guard let address else { return nil }
        var configuration = StatsServerConfiguration(listen: address, version: berthVersion)
        configuration.reusePort = reusePort
        configuration.credentials = statsAuth.flatMap(StatsCredentials.init)
        let server = StatsServer(configuration: configuration, provider: provider)
        do {
            let bound = try server.start()
            let admin = configuration.credentials == nil ? "admin API off (no --stats-auth)" : "basic auth, admin API on"
            log("stats on http://\(bound)/ (\(admin))")
            return server
        } catch {
            server.stop()
            if stats == nil {
                log("warning: stats not served: cannot listen on \(address): \(error) (set --stats HOST:PORT or --stats off)")
                return nil
            }
            throw StatsListenFailure(description: "cannot listen on \(address) for stats: \(error)")
        }
    }
}

struct StatsListenFailure: Error, CustomStringConvertible {
    let description: String
}
