import BerthSystem

/// What one active check does. Pure values; `parse` reads the `--check` flag's forms.
public enum CheckKind: Sendable, Equatable, CustomStringConvertible {
    /// A TCP connect succeeds (HAProxy's default `check`).
    case tcp
    /// `GET path` answered with a status in the expected range.
    case http(HTTPCheck)
    /// A TLS handshake through the system's OpenSSL completes (and verifies, when asked).
    case tls(TLSCheck)
    /// The HTTP check over TLS.
    case https(HTTPCheck, TLSCheck)

    /// Reads `tcp`, `http`, `http:/path`, `tls`, `https`, `https:/path`.
    public static func parse(_ text: String) -> CheckKind? {
        let (scheme, path): (Substring, Substring?) = {
            guard let colon = text.firstIndex(of: ":") else { return (text[...], nil) }
            return (text[..<colon], text[text.index(after: colon)...])
        }()
        if let path, !path.hasPrefix("/") || path.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) {
            return nil
        }
        let http = HTTPCheck(path: path.map(String.init) ?? "/")
        switch scheme {
        case "tcp" where path == nil: return .tcp
        case "tls" where path == nil: return .tls(TLSCheck())
        case "http": return .http(http)
        case "https": return .https(http, TLSCheck())
        default: return nil
        }
    }

    public var name: String {
        switch self {
        case .tcp: "tcp"
        case .http: "http"
        case .tls: "tls"
        case .https: "https"
        }
    }

    public var description: String {
        switch self {
        case .tcp, .tls: name
        case .http(let http), .https(let http, _): "\(name):\(http.path)"
        }
    }

    public var http: HTTPCheck? {
        switch self {
        case .http(let http), .https(let http, _): http
        default: nil
        }
    }

    public var tls: TLSCheck? {
        switch self {
        case .tls(let tls), .https(_, let tls): tls
        default: nil
        }
    }

    /// The same kind with other HTTP or TLS details.
    public func with(http: HTTPCheck? = nil, tls: TLSCheck? = nil) -> CheckKind {
        switch self {
        case .tcp: .tcp
        case .http(let current): .http(http ?? current)
        case .tls(let current): .tls(tls ?? current)
        case .https(let currentHTTP, let currentTLS): .https(http ?? currentHTTP, tls ?? currentTLS)
        }
    }
}

public struct HTTPCheck: Sendable, Equatable {
    public var method = "GET"
    public var path = "/"
    /// Host header; nil sends the backend's address.
    public var host: String?
    /// Healthy statuses, HAProxy's default for `http-check`: 2xx and 3xx.
    public var expectedStatus: ClosedRange<Int> = 200...399

    public init(method: String = "GET", path: String = "/", host: String? = nil, expectedStatus: ClosedRange<Int> = 200...399) {
        self.method = method
        self.path = path
        self.host = host
        self.expectedStatus = expectedStatus
    }

    /// The request bytes for a backend at `address`.
    public func request(for address: SocketAddress) -> [UInt8] {
        Array("\(method) \(path) HTTP/1.1\r\nHost: \(host ?? address.description)\r\nUser-Agent: berth-check\r\nConnection: close\r\n\r\n".utf8)
    }

    /// Reads `200-399` or `200`.
    public static func parseStatusRange(_ text: String) -> ClosedRange<Int>? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 1 || parts.count == 2,
              let low = Int(parts[0]), let high = Int(parts.last!), 100...599 ~= low, 100...599 ~= high, low <= high else {
            return nil
        }
        return low...high
    }
}

public struct TLSCheck: Sendable, Equatable {
    /// SNI name; nil sends none.
    public var serverName: String?
    /// Verify the certificate chain against this CA file (PEM); nil: no verification.
    public var caFile: String?

    public init(serverName: String? = nil, caFile: String? = nil) {
        self.serverName = serverName
        self.caFile = caFile
    }
}

/// HAProxy's check knobs, with the seed's defaults (`inter 2s rise 3 fall 2`). Milliseconds.
public struct CheckSettings: Sendable, Equatable {
    public var kind: CheckKind = .tcp
    public var interval: Int64 = 2_000
    public var timeout: Int64 = 1_000
    public var rise = 3
    public var fall = 2
    /// Each interval is stretched or shortened by up to this fraction, at random, so that the
    /// checks of many backends do not align (HAProxy's `spread-checks`).
    public var jitter = 0.1

    public init(kind: CheckKind = .tcp, interval: Int64 = 2_000, timeout: Int64 = 1_000, rise: Int = 3, fall: Int = 2) {
        self.kind = kind
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
    }
}
