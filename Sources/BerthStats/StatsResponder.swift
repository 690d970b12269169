import BerthHealth
import FoundationEssentials

/// Answers one request: checks credentials, renders the page or applies the admin action.
/// Threads: the stats event loop only (the collector is loop-bound).
struct StatsResponder {
    let collector: StatsCollector
    let credentials: StatsCredentials?

    func respond(method: String, target: String, authorization: String?) -> StatsResponse {
        let route = StatsRoute.resolve(method: method, target: target)
        if route.needsCredentials, let credentials, !credentials.accepts(authorization) {
            var response = StatsResponse.text(401, "authentication required")
            response.extraHeaders = [("WWW-Authenticate", "Basic realm=\"berth stats\", charset=\"UTF-8\"")]
            return response
        }
        switch route {
        case .healthz:
            return .text(200, "ok")
        case .failure(let status, let reason):
            return .text(status, reason)
        case .html(let refresh):
            return StatsResponse(status: 200, contentType: "text/html; charset=utf-8",
                                 body: HTMLRenderer.render(collector.snapshot(), refresh: refresh))
        case .csv:
            return StatsResponse(status: 200, contentType: "text/csv; charset=utf-8", body: CSVRenderer.render(collector.snapshot()))
        case .json:
            let body = (try? JSONEncoder.sorted.encode(collector.snapshot())).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            return StatsResponse(status: 200, contentType: "application/json", body: body + "\n")
        case .metrics:
            return StatsResponse(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8",
                                 body: MetricsRenderer.render(collector.snapshot()))
        case .admin(let service, let backend, let action):
            let key = BackendKey(frontend: service, backend: backend)
            if let refusal = adminCall(collector.provider.setAdminState, { (apply) throws(AdminError) in try apply(action, key) }) {
                return refusal
            }
            return .json(200, ["service": service, "backend": backend, "state": action.rawValue])
        case .weight(let service, let backend, let weight):
            let key = BackendKey(frontend: service, backend: backend)
            if let refusal = adminCall(collector.provider.setWeight, { (apply) throws(AdminError) in try apply(weight, key) }) {
                return refusal
            }
            return .json(200, ["service": service, "backend": backend, "weight": weight.map(String.init) ?? "reset"])
        }
    }
}

extension StatsResponder {
    /// Runs an admin action; nil when it was applied, else the answer saying why not. Admin
    /// needs credentials configured: without --stats-auth nobody may change state.
    private func adminCall<Setter>(_ setter: Setter?, _ call: (Setter) throws(AdminError) -> Void) -> StatsResponse? {
        guard credentials != nil, let setter else {
            return .text(403, "the admin API is off: start berth with --stats-auth USER:PASS")
        }
        do throws(AdminError) {
            try call(setter)
            return nil
        } catch {
            switch error {
            case .unknownBackend: return .json(404, ["error": error.description])
            case .badWeight: return .json(400, ["error": error.description])
            case .engine: return .json(500, ["error": error.description])
            }
        }
    }
}

extension StatsResponse {
    /// The response on the wire: status line, headers, and the body unless `head` (HEAD).
    func encoded(keepAlive: Bool, head: Bool) -> [UInt8] {
        var text = "HTTP/1.1 \(status) \(Self.reason(status))\r\n"
        text += "Content-Type: \(contentType)\r\nContent-Length: \(body.utf8.count)\r\n"
        text += "Cache-Control: no-cache\r\nServer: berth\r\nConnection: \(keepAlive ? "keep-alive" : "close")\r\n"
        for (name, value) in extraHeaders { text += "\(name): \(value)\r\n" }
        text += "\r\n"
        if !head { text += body }
        return Array(text.utf8)
    }

    static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 413: "Payload Too Large"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 501: "Not Implemented"
        case 503: "Service Unavailable"
        default: "Status"
        }
    }
}
