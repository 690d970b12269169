/// Where and how to reach etcd: endpoints in failover order, credentials, TLS, time limits.
public struct EtcdConfiguration: Sendable, Equatable {
    public var endpoints: [EtcdEndpoint]
    /// Username and password for etcd's auth (`etcdctl auth enable`); nil: no auth.
    public var credentials: Credentials?
    /// PEM files for https endpoints (and for plain endpoints when `forceTLS`).
    public var tls: TLSFiles?
    /// Every unary request (Range, Put, ...) fails after this long on one endpoint.
    public var requestTimeout: Duration = .seconds(5)
    /// Reconnect delays: doubled per failure from `initial` up to `maximum`, with jitter.
    public var backoff = Backoff.Settings()
    /// A watch stream that delivers nothing (not even an answer to a progress request) for this
    /// long is taken for dead and reopened, on the next endpoint.
    /// Short, so that a cut is told from a quiet stream within seconds (a progress request is
    /// one small message each way).
    public var watchProgressInterval: Duration = .seconds(2)

    public struct Credentials: Sendable, Equatable {
        public var username: String
        public var password: String
        public init(username: String, password: String) {
            self.username = username
            self.password = password
        }
    }

    public struct TLSFiles: Sendable, Equatable {
        /// CA bundle that signs the servers' certificates; nil: the system's roots.
        public var caFile: String?
        /// Client certificate and key, for etcd's `--client-cert-auth`.
        public var certificateFile: String?
        public var keyFile: String?
        public init(caFile: String? = nil, certificateFile: String? = nil, keyFile: String? = nil) {
            self.caFile = caFile
            self.certificateFile = certificateFile
            self.keyFile = keyFile
        }
    }

    public init(endpoints: [EtcdEndpoint], credentials: Credentials? = nil, tls: TLSFiles? = nil) {
        self.endpoints = endpoints
        self.credentials = credentials
        self.tls = tls
    }
}

/// One etcd member's client URL.
public struct EtcdEndpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var secure: Bool

    public init(host: String, port: Int, secure: Bool = false) {
        self.host = host
        self.port = port
        self.secure = secure
    }

    public var description: String {
        let shownHost = host.contains(":") ? "[\(host)]" : host
        return "\(secure ? "https" : "http")://\(shownHost):\(port)"
    }

    /// Parses `http://host:port`, `https://host:port`, `host:port` (the seed's `ETCD_HOST`),
    /// `[v6]:port`, or `host` alone (port 2379), separated by commas.
    public static func parseList(_ text: String) throws(EtcdError) -> [EtcdEndpoint] {
        let parts = text.split(separator: ",").map { $0.trimmingWhitespace() }.filter { !$0.isEmpty }
        guard !parts.isEmpty else { throw .invalidEndpoint(text, "no endpoint given") }
        var result: [EtcdEndpoint] = []
        for part in parts { result.append(try parse(String(part))) }
        return result
    }

    public static func parse(_ text: String) throws(EtcdError) -> EtcdEndpoint {
        var rest = Substring(text)
        var secure = false
        if rest.hasPrefix("https://") {
            secure = true
            rest = rest.dropFirst(8)
        } else if rest.hasPrefix("http://") {
            rest = rest.dropFirst(7)
        } else if rest.contains("://") {
            throw .invalidEndpoint(text, "the scheme must be http or https")
        }
        if let slash = rest.firstIndex(of: "/") {
            guard rest[slash...].allSatisfy({ $0 == "/" }) else { throw .invalidEndpoint(text, "an endpoint has no path") }
            rest = rest[..<slash]
        }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw .invalidEndpoint(text, "unclosed '['") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw .invalidEndpoint(text, "expected ':' after ']'") }
                portText = after.dropFirst()
            }
        } else if let colon = rest.lastIndex(of: ":") {
            guard rest.firstIndex(of: ":") == colon else {
                throw .invalidEndpoint(text, "write an IPv6 address in brackets: [::1]:2379")
            }
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        guard !host.isEmpty else { throw .invalidEndpoint(text, "no host") }
        var port = 2379
        if let portText {
            guard let parsed = Int(portText), (1...65535).contains(parsed) else {
                throw .invalidEndpoint(text, "'\(portText)' is not a port (1-65535)")
            }
            port = parsed
        }
        return EtcdEndpoint(host: String(host), port: port, secure: secure)
    }
}

extension Substring {
    func trimmingWhitespace() -> Substring {
        var result = self
        while let first = result.first, first.isWhitespace { result = result.dropFirst() }
        while let last = result.last, last.isWhitespace { result = result.dropLast() }
        return result
    }
}
