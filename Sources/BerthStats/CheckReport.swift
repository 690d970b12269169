import BerthHealth

/// A backend's health as the stats pages show it, with HAProxy's check_status codes so that
/// tools written for HAProxy's CSV read them unchanged. Pure.
enum CheckReport {
    static func stats(_ health: BackendHealth, settings: CheckSettings?, now: Int64) -> CheckStats {
        let (code, httpStatus) = code(kind: health.kind, result: health.lastResult)
        return CheckStats(
            kind: health.kind, code: code, httpStatus: httpStatus,
            detail: health.lastResult?.detail ?? "no check run yet",
            durationMilliseconds: health.lastResult?.duration,
            secondsSinceChange: Double(max(0, now - health.lastChange)) / 1000,
            rise: settings?.rise ?? 0, fall: settings?.fall ?? 0,
            consecutiveSuccesses: health.consecutiveSuccesses,
            consecutiveFailures: health.consecutiveFailures,
            checksDone: health.checksDone, ejections: health.ejections)
    }

    /// HAProxy's code for a result: L4 (TCP connect), L6 (TLS handshake), L7 (HTTP status line).
    /// INI: no check has run yet.
    static func code(kind: String, result: CheckResult?) -> (code: String, httpStatus: Int?) {
        guard let result else { return ("INI", nil) }
        let detail = result.detail
        var httpStatus: Int?
        if detail.hasPrefix("HTTP "), let status = Int(detail.dropFirst(5).prefix(3)) { httpStatus = status }
        let layer7 = kind.hasPrefix("http")
        let layer6 = kind.hasPrefix("tls") || kind.hasPrefix("https")
        if result.succeeded {
            return (layer7 ? "L7OK" : layer6 ? "L6OK" : "L4OK", httpStatus)
        }
        if httpStatus != nil { return ("L7STS", httpStatus) }
        if detail.hasPrefix("timeout") {
            // The probe names the stage it was stuck in: a connect never answered is layer 4
            // whatever the check's kind (a silent host), as in HAProxy.
            if detail.hasPrefix("timeout connecting") { return ("L4TOUT", nil) }
            if detail.contains("TLS") { return ("L6TOUT", nil) }
            return (layer7 ? "L7TOUT" : layer6 ? "L6TOUT" : "L4TOUT", nil)
        }
        if detail.hasPrefix("connect") { return ("L4CON", nil) }
        if detail.contains("TLS") || detail.contains("SSL") || detail.contains("certificate") { return ("L6RSP", nil) }
        return (layer7 ? "L7RSP" : "L4CON", nil)
    }
}
