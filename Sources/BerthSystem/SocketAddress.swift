import Glibc

/// An IPv4 or IPv6 socket address (numeric host and port).
///
/// Text forms accepted by `init(parsing:)`, as HAProxy's `bind`/`server` lines write them:
/// `127.0.0.1:8000`, `[::1]:8000`, `*:8000` or `:8000` (all IPv4 addresses), `localhost:8000`
/// (127.0.0.1). Host names other than `localhost` are not resolved here: name resolution belongs
/// to the control plane, off the event loops.
public struct SocketAddress: Sendable, Hashable, CustomStringConvertible {
    enum Storage: Sendable {
        case v4(sockaddr_in)
        case v6(sockaddr_in6)
    }

    let storage: Storage

    public init(ipv4 host: (UInt8, UInt8, UInt8, UInt8), port: UInt16) {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        let value = UInt32(host.0) << 24 | UInt32(host.1) << 16 | UInt32(host.2) << 8 | UInt32(host.3)
        address.sin_addr.s_addr = value.bigEndian
        storage = .v4(address)
    }

    init(storage: Storage) {
        self.storage = storage
    }

    /// Parses `HOST:PORT`; throws `AddressError` with a message fit for the command line.
    public init(parsing text: String) throws(AddressError) {
        let (host, portText) = try SocketAddress.split(text)
        guard let port = UInt16(portText), !portText.isEmpty else {
            throw AddressError(text: text, reason: "the port must be a number from 0 to 65535")
        }
        try self.init(host: host, port: port, original: text)
    }

    /// Builds an address from a numeric host (or `localhost`, `*`, empty) and a port.
    public init(host: String, port: UInt16) throws(AddressError) {
        try self.init(host: host, port: port, original: host)
    }

    private init(host: String, port: UInt16, original: String) throws(AddressError) {
        var host = host
        if host.isEmpty || host == "*" { host = "0.0.0.0" }
        if host == "localhost" { host = "127.0.0.1" }
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            address.sin_addr = v4
            storage = .v4(address)
            return
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            address.sin6_addr = v6
            storage = .v6(address)
            return
        }
        throw AddressError(text: original, reason: "'\(host)' is not an IPv4 or IPv6 address")
    }

    private static func split(_ text: String) throws(AddressError) -> (host: String, port: Substring) {
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw AddressError(text: text, reason: "missing ']' after the IPv6 address")
            }
            let host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else {
                throw AddressError(text: text, reason: "expected ':PORT' after ']'")
            }
            return (host, rest.dropFirst())
        }
        guard let colon = text.lastIndex(of: ":") else {
            throw AddressError(text: text, reason: "expected HOST:PORT")
        }
        let host = String(text[..<colon])
        if host.contains(":") {
            throw AddressError(text: text, reason: "write IPv6 addresses in brackets, as [::1]:8080")
        }
        return (host, text[text.index(after: colon)...])
    }

    /// Reads an address the kernel filled in (accept, getsockname).
    public init?(_ raw: sockaddr_storage) {
        var raw = raw
        switch Int32(raw.ss_family) {
        case AF_INET:
            let address = withUnsafeBytes(of: &raw) { $0.load(as: sockaddr_in.self) }
            storage = .v4(address)
        case AF_INET6:
            let address = withUnsafeBytes(of: &raw) { $0.load(as: sockaddr_in6.self) }
            storage = .v6(address)
        default:
            return nil
        }
    }

    public var family: CInt {
        switch storage {
        case .v4: AF_INET
        case .v6: AF_INET6
        }
    }

    public var port: UInt16 {
        switch storage {
        case .v4(let address): UInt16(bigEndian: address.sin_port)
        case .v6(let address): UInt16(bigEndian: address.sin6_port)
        }
    }

    /// The same host with another port.
    public func withPort(_ port: UInt16) -> SocketAddress {
        switch storage {
        case .v4(var address):
            address.sin_port = port.bigEndian
            return SocketAddress(storage: .v4(address))
        case .v6(var address):
            address.sin6_port = port.bigEndian
            return SocketAddress(storage: .v6(address))
        }
    }

    /// The host part as text, without brackets.
    public var host: String {
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN) + 1)
        switch storage {
        case .v4(var address):
            _ = inet_ntop(AF_INET, &address.sin_addr, &buffer, socklen_t(buffer.count))
        case .v6(var address):
            _ = inet_ntop(AF_INET6, &address.sin6_addr, &buffer, socklen_t(buffer.count))
        }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public var description: String {
        switch storage {
        case .v4: "\(host):\(port)"
        case .v6: "[\(host)]:\(port)"
        }
    }

    /// Lends the address as a `sockaddr` pointer and length, for bind and connect.
    @inline(__always)
    func withSockAddr<Result>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> Result) -> Result {
        switch storage {
        case .v4(var address):
            return withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .v6(var address):
            return withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    body($0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        }
    }

    /// Lends the address's host bytes (4 for IPv4, 16 for IPv6; no port), without allocating.
    @inline(__always)
    public func withHostBytes<Result>(_ body: (UnsafeRawBufferPointer) -> Result) -> Result {
        switch storage {
        case .v4(let address): withUnsafeBytes(of: address.sin_addr) { body($0) }
        case .v6(let address): withUnsafeBytes(of: address.sin6_addr) { body($0) }
        }
    }

    /// Family, host, port (and an IPv6 scope): what makes two addresses the same. Compared and
    /// hashed without allocating (tables compare their backends' addresses on every change).
    public static func == (lhs: SocketAddress, rhs: SocketAddress) -> Bool {
        switch (lhs.storage, rhs.storage) {
        case (.v4(let a), .v4(let b)):
            a.sin_addr.s_addr == b.sin_addr.s_addr && a.sin_port == b.sin_port
        case (.v6(let a), .v6(let b)):
            a.sin6_port == b.sin6_port && a.sin6_scope_id == b.sin6_scope_id
                && withUnsafeBytes(of: a.sin6_addr) { x in withUnsafeBytes(of: b.sin6_addr) { y in x.elementsEqual(y) } }
        default:
            false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch storage {
        case .v4(let address):
            hasher.combine(UInt8(4))
            hasher.combine(address.sin_addr.s_addr)
            hasher.combine(address.sin_port)
        case .v6(let address):
            hasher.combine(UInt8(6))
            withUnsafeBytes(of: address.sin6_addr) { hasher.combine(bytes: $0) }
            hasher.combine(address.sin6_scope_id)
            hasher.combine(address.sin6_port)
        }
    }
}

/// A host:port that does not parse, with the reason in words.
public struct AddressError: Error, CustomStringConvertible, Sendable, Equatable {
    public let text: String
    public let reason: String

    public var description: String { "invalid address '\(text)': \(reason)" }
}
