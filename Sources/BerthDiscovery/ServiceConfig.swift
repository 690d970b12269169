import BerthEngine
import BerthRegistry
import BerthSystem
import BerthHealth

/// Service settings read from `<prefix>/_config/<service>`; every field optional, unset fields
/// fall back to the command line's defaults. Unknown fields are ignored (later versions may add
/// some); a known field with a wrong type or value makes the whole value malformed.
///
/// ```
/// {"listen":8000,
///  "check":{"kind":"http","path":"/health","interval":"2s","timeout":"1s","rise":2,"fall":3,
///           "status":"200-399","host":"example.org","sni":"example.org"},
///  "connect_timeout":"5s","client_timeout":"1m","server_timeout":"1m","retries":3,"linger":"30s",
///  "log_connections":true,"send_proxy":"v2","balance":"leastconn","slow_start":"30s"}
/// ```
/// Durations as HAProxy writes them (`500ms`, `2s`, `1m`; a bare number is ms) or JSON numbers
/// of milliseconds.
public struct ServiceConfig: Sendable, Equatable {
    public var listen: UInt16?
    public var check: CheckOverrides?
    /// Milliseconds.
    public var connectTimeout: Int64?
    public var clientTimeout: Int64?
    public var serverTimeout: Int64?
    public var retries: Int?
    /// How long the frontend of a service with no instances stays open (ms).
    public var linger: Int64?
    /// One log line per closed connection (`--log-connections` for this service only).
    public var logConnections: Bool?
    /// `"send_proxy"`: `"v1"`, `"v2"` (the PROXY protocol header to its backends) or `"none"`
    /// (`.some(nil)`: off for this service whatever the command line says).
    public var sendProxy: ProxyProtocolVersion??
    /// `"balance"`: `"roundrobin"`, `"leastconn"` or `"source"`.
    public var balance: BalanceMode?
    /// `"slow_start"`: ms (0: off for this service).
    public var slowStart: Int64?

    public init(listen: UInt16? = nil, check: CheckOverrides? = nil, connectTimeout: Int64? = nil,
                clientTimeout: Int64? = nil, serverTimeout: Int64? = nil, retries: Int? = nil, linger: Int64? = nil) {
        self.listen = listen
        self.check = check
        self.connectTimeout = connectTimeout
        self.clientTimeout = clientTimeout
        self.serverTimeout = serverTimeout
        self.retries = retries
        self.linger = linger
    }

    public static func parse(_ bytes: [UInt8]) throws(ValueError) -> ServiceConfig {
        guard bytes.contains(where: { !InstanceRecord.isWhiteSpace($0) }) else { throw ValueError(.empty, "empty value") }
        let object = try JSONObject(JSONValue.parse(bytes), what: "a service config")
        var config = ServiceConfig()
        config.listen = try object.port("listen")
        config.connectTimeout = try object.duration("connect_timeout")
        if config.connectTimeout == 0 {
            throw ValueError(.badDuration, "'connect_timeout' must be positive (0 would fail every connect)")
        }
        config.clientTimeout = try object.duration("client_timeout")
        config.serverTimeout = try object.duration("server_timeout")
        config.retries = try object.integer("retries", in: 0...100).map { Int($0) }
        config.linger = try object.duration("linger")
        config.logConnections = try object.bool("log_connections")
        if let text = try object.string("send_proxy") {
            guard text == "none" || ProxyProtocolVersion(rawValue: text) != nil else {
                throw ValueError(.wrongType, "'send_proxy' '\(text.prefix(20))' is not v1, v2 or none")
            }
            config.sendProxy = .some(ProxyProtocolVersion(rawValue: text))
        }
        if let text = try object.string("balance") {
            guard let balance = BalanceMode(rawValue: text) else {
                throw ValueError(.wrongType, "'balance' '\(text.prefix(20))' is not roundrobin, leastconn or source")
            }
            config.balance = balance
        }
        config.slowStart = try object.duration("slow_start")
        if let check = object["check"] {
            config.check = try CheckOverrides.parse(JSONObject(check, what: "'check'"))
        }
        return config
    }

    /// `defaults` with this service's timeouts and retries.
    public func frontendSettings(over defaults: FrontendSettings) -> FrontendSettings {
        var settings = defaults
        if let connectTimeout { settings.connectTimeout = connectTimeout }
        if let clientTimeout { settings.clientTimeout = clientTimeout }
        if let serverTimeout { settings.serverTimeout = serverTimeout }
        if let retries { settings.retries = retries }
        if let logConnections { settings.logConnections = logConnections }
        if let sendProxy { settings.sendProxy = sendProxy }
        if let balance { settings.balance = balance }
        if let slowStart { settings.slowStart = slowStart }
        return settings
    }
}

/// The `check` object of a service config: what to change in the process-wide check settings.
public struct CheckOverrides: Sendable, Equatable {
    /// `tcp`, `http`, `tls`, `https` (or `http:/path`), parsed by `CheckKind.parse`.
    public var kind: CheckKind?
    public var path: String?
    /// Host header of http/https checks.
    public var host: String?
    public var status: ClosedRange<Int>?
    /// SNI name of tls/https checks.
    public var serverName: String?
    public var interval: Int64?
    public var timeout: Int64?
    public var rise: Int?
    public var fall: Int?

    public init(kind: CheckKind? = nil, path: String? = nil, host: String? = nil, status: ClosedRange<Int>? = nil,
                serverName: String? = nil, interval: Int64? = nil, timeout: Int64? = nil, rise: Int? = nil, fall: Int? = nil) {
        self.kind = kind
        self.path = path
        self.host = host
        self.status = status
        self.serverName = serverName
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
    }

    static func parse(_ object: JSONObject) throws(ValueError) -> CheckOverrides {
        var overrides = CheckOverrides()
        if let kindText = try object.string("kind") {
            guard let kind = CheckKind.parse(kindText) else {
                throw ValueError(.badCheck, "check 'kind' '\(kindText.prefix(40))' is not tcp, http, tls or https")
            }
            overrides.kind = kind
        }
        if let path = try object.string("path") {
            guard path.hasPrefix("/"), !path.contains(where: { $0 == " " || $0 == "\r" || $0 == "\n" }) else {
                throw ValueError(.badCheck, "check 'path' must start with / and hold no spaces")
            }
            if let kind = overrides.kind, kind.http == nil {
                throw ValueError(.badCheck, "check 'path' needs kind http or https, not \(kind.name)")
            }
            overrides.path = path
        }
        overrides.host = try object.string("host")
        overrides.serverName = try object.string("sni")
        if let status = try object.string("status") {
            guard let range = HTTPCheck.parseStatusRange(status) else {
                throw ValueError(.badCheck, "check 'status' '\(status.prefix(20))' is not a status or a range such as 200-399")
            }
            overrides.status = range
        }
        overrides.interval = try object.duration("interval")
        overrides.timeout = try object.duration("timeout")
        if let interval = overrides.interval, interval < 10 {
            throw ValueError(.badCheck, "check 'interval' must be at least 10ms")
        }
        if let timeout = overrides.timeout, timeout < 1 {
            throw ValueError(.badCheck, "check 'timeout' must be positive")
        }
        overrides.rise = try object.integer("rise", in: 1...100).map { Int($0) }
        overrides.fall = try object.integer("fall", in: 1...100).map { Int($0) }
        return overrides
    }

    /// `base` (the process-wide settings) with these changes. A `path`, `host` or `status`
    /// given for a base kind without HTTP turns it into `http`.
    public func settings(over base: CheckSettings) -> CheckSettings {
        var settings = base
        var kind = self.kind ?? base.kind
        if kind.http == nil && (path != nil || host != nil || status != nil) && self.kind == nil {
            kind = .http(HTTPCheck())
        }
        if var http = kind.http {
            if let path { http.path = path }
            if let host { http.host = host }
            if let status { http.expectedStatus = status }
            kind = kind.with(http: http)
        }
        if var tls = kind.tls, let serverName {
            tls.serverName = serverName
            kind = kind.with(tls: tls)
        }
        settings.kind = kind
        if let interval { settings.interval = interval }
        if let timeout { settings.timeout = timeout }
        if let rise { settings.rise = rise }
        if let fall { settings.fall = fall }
        return settings
    }
}
