import BerthRegistry
import BerthSystem
import BerthHealth
import FoundationEssentials

/// What a request asks for. Pure: `resolve` reads the method and the request target only.
enum StatsRoute: Equatable {
    case html(refresh: Int?)
    case csv
    case json
    case metrics
    case healthz
    case admin(service: String, backend: String, action: AdminState)
    /// Sets (or with nil, clears) an operator weight: HAProxy's `set server weight`.
    case weight(service: String, backend: String, weight: Int?)
    /// 404, 405 or 400 with a reason.
    case failure(status: Int, reason: String)

    /// The admin API's verbs: HAProxy's `set server state ready|drain|maint`, `ready` spelt `enable`.
    static let actions: [String: AdminState] = ["enable": .ready, "ready": .ready, "drain": .drain, "maint": .maint]

    static func resolve(method: String, target: String) -> StatsRoute {
        let (path, query) = split(target)
        // HAProxy's options ride on the path after ';' (`/;csv`, `/;csv;norefresh`, `/stats;csv`).
        let parts = path.split(separator: ";", omittingEmptySubsequences: false).map(String.init)
        let base = parts[0]
        let options = Set(parts.dropFirst())
        if base.hasPrefix("/admin/") {
            guard method == "POST" else { return .failure(status: 405, reason: "the admin API takes POST") }
            return admin(base)
        }
        guard method == "GET" || method == "HEAD" else { return .failure(status: 405, reason: "only GET and HEAD here") }
        switch base {
        case "/", "/stats":
            if options.contains("csv") { return .csv }
            if options.contains("json") { return .json }
            return .html(refresh: refresh(query))
        case "/stats.json": return .json
        case "/stats.csv": return .csv
        case "/metrics": return .metrics
        case "/healthz": return .healthz
        default: return .failure(status: 404, reason: "no such page; see / , /;csv , /stats.json , /metrics , /healthz")
        }
    }

    /// `/admin/backends/<service>/<backend>/<action>`, names percent-decoded.
    private static func admin(_ path: String) -> StatsRoute {
        let components = path.split(separator: "/", omittingEmptySubsequences: false).dropFirst().map(String.init)
        guard components.count == 5 || (components.count == 6 && components[4] == "weight"), components[1] == "backends" else {
            return .failure(status: 404, reason: "admin paths are /admin/backends/SERVICE/BACKEND/drain|enable|maint and /admin/backends/SERVICE/BACKEND/weight/0-256|reset")
        }
        guard let service = PercentEncoding.decode(components[2]), !service.isEmpty,
              let backend = PercentEncoding.decode(components[3]), !backend.isEmpty else {
            return .failure(status: 400, reason: "bad service or backend name")
        }
        if components.count == 6 {
            if components[5] == "reset" { return .weight(service: service, backend: backend, weight: nil) }
            guard components[5].count <= 3, components[5].allSatisfy(\.isASCII), let weight = Int(components[5]), (0...256).contains(weight) else {
                return .failure(status: 400, reason: "bad weight '\(components[5].prefix(16))': a number from 0 to 256, or reset")
            }
            return .weight(service: service, backend: backend, weight: weight)
        }
        guard let action = actions[components[4]] else {
            return .failure(status: 400, reason: "unknown action '\(components[4])': drain, enable or maint")
        }
        return .admin(service: service, backend: backend, action: action)
    }

    private static func split(_ target: String) -> (path: String, query: String) {
        guard let mark = target.firstIndex(of: "?") else { return (target, "") }
        return (String(target[..<mark]), String(target[target.index(after: mark)...]))
    }

    /// `refresh=N`, N seconds from 1 to 3600; anything else: no refresh.
    private static func refresh(_ query: String) -> Int? {
        for pair in query.split(separator: "&") {
            let fields = pair.split(separator: "=", maxSplits: 1)
            if fields.count == 2, fields[0] == "refresh", let seconds = Int(fields[1]), (1...3600).contains(seconds) {
                return seconds
            }
        }
        return nil
    }

    /// Pages that need credentials when `--stats-auth` is set (`/healthz` never does: it says
    /// only that the stats server answers).
    var needsCredentials: Bool {
        switch self {
        case .healthz, .failure: false
        default: true
        }
    }
}

/// `--stats-auth user:pass`: HTTP basic authentication. The expected header is computed once;
/// a request's is compared in constant time.
public struct StatsCredentials: Sendable, Equatable {
    public let user: String
    private let expected: [UInt8]

    /// Parses `user:pass` (the password may contain ':'); nil when malformed.
    public init?(_ text: String) {
        guard let colon = text.firstIndex(of: ":"), colon != text.startIndex,
              text.index(after: colon) != text.endIndex,
              !text.contains(where: { $0 == "\r" || $0 == "\n" }) else { return nil }
        user = String(text[..<colon])
        expected = Array(Data(text.utf8).base64EncodedString().utf8)
    }

    /// The value of an `Authorization` header these credentials produce.
    public var headerValue: String { "Basic " + String(decoding: expected, as: UTF8.self) }

    /// True for `Basic <base64 of user:pass>` (scheme case-insensitive).
    func accepts(_ header: String?) -> Bool {
        guard let header else { return false }
        let fields = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard fields.count == 2, fields[0].lowercased() == "basic" else { return false }
        let given = Array(fields[1].utf8.filter { $0 != 0x20 && $0 != 0x09 })
        // Constant time over the expected length: the comparison does not stop at the first difference.
        var difference = UInt8(given.count == expected.count ? 0 : 1)
        for index in expected.indices {
            difference |= expected[index] ^ (index < given.count ? given[index] : 0)
        }
        return difference == 0
    }
}

/// One response, before encoding.
struct StatsResponse {
    var status: Int
    var contentType: String
    var body: String
    var extraHeaders: [(String, String)] = []
    /// Close the connection after this response (errors of the client's making).
    var close = false

    static func text(_ status: Int, _ body: String, close: Bool = false) -> StatsResponse {
        StatsResponse(status: status, contentType: "text/plain; charset=utf-8", body: body + "\n", close: close)
    }

    static func json(_ status: Int, _ object: [String: String]) -> StatsResponse {
        let body = (try? String(decoding: JSONEncoder.sorted.encode(object), as: UTF8.self)) ?? "{}"
        return StatsResponse(status: status, contentType: "application/json", body: body + "\n")
    }
}

extension JSONEncoder {
    /// Sorted keys, so that pages and tests see a stable order.
    static var sorted: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
        return encoder
    }
}
