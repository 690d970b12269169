import ArgumentParser
import Glibc
import BerthSystem
import BerthHealth

/// The health-check flags, shared by every command that proxies.
struct HealthOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [
        ("--check", "BERTH_CHECK"), ("--check-interval", "BERTH_CHECK_INTERVAL"),
        ("--check-timeout", "BERTH_CHECK_TIMEOUT"), ("--rise", "BERTH_RISE"), ("--fall", "BERTH_FALL"),
        ("--check-host", "BERTH_CHECK_HOST"), ("--check-status", "BERTH_CHECK_STATUS"),
        ("--check-ca", "BERTH_CHECK_CA"), ("--check-sni", "BERTH_CHECK_SNI"),
        ("--observe-errors", "BERTH_OBSERVE_ERRORS"), ("--new-backend-state", "BERTH_NEW_BACKEND_STATE"),
        ("--all-down", "BERTH_ALL_DOWN"),
    ]

    @Option(help: EnvironmentFlags.help("Active check of every backend: tcp (connect), http:/path (status 2xx-3xx), tls (handshake), https:/path, or none.", "BERTH_CHECK"))
    var check: String = "none"

    @Option(help: EnvironmentFlags.help("Time from the start of one check of a backend to the start of the next (HAProxy's inter, jittered by 10%); after a check that ran longer, the next starts at once.", "BERTH_CHECK_INTERVAL"), transform: DurationArgument.parse)
    var checkInterval = DurationArgument(milliseconds: 2_000)

    @Option(help: EnvironmentFlags.help("A check not finished by then has failed; its connect must complete within the smaller of this and --check-interval (HAProxy's rule), so that a host that drops SYNs is found within fall x interval.", "BERTH_CHECK_TIMEOUT"), transform: DurationArgument.parse)
    var checkTimeout = DurationArgument(milliseconds: 1_000)

    @Option(help: EnvironmentFlags.help("Successful checks in a row that bring a down backend up.", "BERTH_RISE"))
    var rise: Int = 3

    @Option(help: EnvironmentFlags.help("Failed checks in a row that take an up backend down.", "BERTH_FALL"))
    var fall: Int = 2

    @Option(help: EnvironmentFlags.help("Host header of http/https checks (default: the backend's address).", "BERTH_CHECK_HOST"))
    var checkHost: String?

    @Option(help: EnvironmentFlags.help("Healthy HTTP statuses, as 200-399 or 200.", "BERTH_CHECK_STATUS"))
    var checkStatus: String = "200-399"

    @Option(help: EnvironmentFlags.help("Verify tls/https check certificates against this CA file (PEM); without it, no verification.", "BERTH_CHECK_CA"))
    var checkCa: String?

    @Option(help: EnvironmentFlags.help("Server name (SNI, and the name verified with --check-ca) for tls/https checks.", "BERTH_CHECK_SNI"))
    var checkSni: String?

    @Option(help: EnvironmentFlags.help("Passive check: this many failed connects in a row from live traffic take a backend down at once; active checks bring it back (0: off).", "BERTH_OBSERVE_ERRORS"))
    var observeErrors: Int = 3

    @Option(help: EnvironmentFlags.help("State of a new backend until its checks: up (takes traffic at once) or down (none until rise checks pass).", "BERTH_NEW_BACKEND_STATE"))
    var newBackendState: NewBackendState = .up

    @Option(help: EnvironmentFlags.help("When every backend is down: reject (close new clients at once) or try-all (route to all anyway).", "BERTH_ALL_DOWN"))
    var allDown: AllDownPolicy = .reject

    func validate() throws {
        if check != "none" && CheckKind.parse(check) == nil {
            throw invalid("--check", check, "tcp, http:/path, tls, https:/path or none")
        }
        if HTTPCheck.parseStatusRange(checkStatus) == nil {
            throw invalid("--check-status", checkStatus, "a status or a range such as 200-399")
        }
        if rise < 1 || rise > 100 { throw invalid("--rise", "\(rise)", "a number from 1 to 100") }
        if fall < 1 || fall > 100 { throw invalid("--fall", "\(fall)", "a number from 1 to 100") }
        if observeErrors < 0 { throw invalid("--observe-errors", "\(observeErrors)", "0 or more") }
        if checkInterval.milliseconds < 10 { throw invalid("--check-interval", "\(checkInterval)", "at least 10ms") }
        if checkTimeout.milliseconds < 1 { throw invalid("--check-timeout", "\(checkTimeout)", "a positive duration") }
        if let checkCa, !FileCheck.readable(checkCa) { throw invalid("--check-ca", checkCa, "a readable PEM file") }
    }

    var policy: HealthPolicy {
        guard check != "none", let parsed = CheckKind.parse(check) else {
            return HealthPolicy(checks: nil, newBackendState: newBackendState, allDown: allDown)
        }
        var http = parsed.http ?? HTTPCheck()
        http.host = checkHost
        http.expectedStatus = HTTPCheck.parseStatusRange(checkStatus) ?? 200...399
        let kind = parsed.with(http: http, tls: TLSCheck(serverName: checkSni, caFile: checkCa))
        let settings = CheckSettings(kind: kind, interval: checkInterval.milliseconds,
                                     timeout: checkTimeout.milliseconds, rise: rise, fall: fall)
        return HealthPolicy(checks: settings, newBackendState: newBackendState, allDown: allDown)
    }

    var summary: String {
        check == "none" ? "off" : "\(check) every \(checkInterval), rise \(rise), fall \(fall)"
    }
}

extension NewBackendState: ExpressibleByArgument {}
extension AllDownPolicy: ExpressibleByArgument {}

enum FileCheck {
    static func readable(_ path: String) -> Bool {
        access(path, R_OK) == 0
    }
}
