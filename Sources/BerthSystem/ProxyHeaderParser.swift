import Glibc

/// Reads a PROXY protocol header (v1 text or v2 binary, HAProxy's doc/proxy-protocol.txt) at the
/// start of a connection: what a backend behind a proxy with `send-proxy` does first. Pure.
public enum ProxyHeaderParser {
    public enum Outcome: Equatable, Sendable {
        /// More bytes are needed (nothing is wrong yet).
        case incomplete
        /// Not a PROXY header, or a malformed one: the connection should be closed.
        case invalid(String)
        /// A header of `length` bytes; `source` and `destination` are nil for v1 `UNKNOWN`,
        /// v2 `LOCAL` and v2 families other than TCP over IPv4/IPv6.
        case complete(source: SocketAddress?, destination: SocketAddress?, length: Int)
    }

    /// The 12 bytes every v2 header starts with.
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    /// The longest v1 line, CRLF included.
    public static let v1Limit = 107

    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Outcome {
        guard let first = bytes.first else { return .incomplete }
        if first == v2Signature[0] { return parseV2(bytes) }
        if first == UInt8(ascii: "P") { return parseV1(bytes) }
        return .invalid("not a PROXY protocol header")
    }

    public static func parse(_ bytes: [UInt8]) -> Outcome {
        bytes.withUnsafeBytes { parse($0) }
    }

    // MARK: v1

    private static func parseV1(_ bytes: UnsafeRawBufferPointer) -> Outcome {
        let prefix = Array("PROXY ".utf8)
        for (index, byte) in prefix.enumerated() where index < bytes.count {
            if bytes[index] != byte { return .invalid("not a PROXY protocol header") }
        }
        guard let end = (0..<min(bytes.count, v1Limit)).first(where: { bytes[$0] == UInt8(ascii: "\n") }) else {
            return bytes.count >= v1Limit ? .invalid("PROXY v1 line longer than \(v1Limit) bytes") : .incomplete
        }
        guard end > 0, bytes[end - 1] == UInt8(ascii: "\r") else { return .invalid("PROXY v1 line does not end in CRLF") }
        let line = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[prefix.count..<(end - 1)]), as: UTF8.self)
        let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        if fields.first == "UNKNOWN" { return .complete(source: nil, destination: nil, length: end + 1) }
        guard fields.count == 5, fields[0] == "TCP4" || fields[0] == "TCP6" else {
            return .invalid("PROXY v1 needs TCP4|TCP6 SRC DST SPORT DPORT")
        }
        guard let sourcePort = port(fields[3]), let destinationPort = port(fields[4]),
              let source = address(fields[1], port: sourcePort, v6: fields[0] == "TCP6"),
              let destination = address(fields[2], port: destinationPort, v6: fields[0] == "TCP6") else {
            return .invalid("PROXY v1 addresses or ports are malformed")
        }
        return .complete(source: source, destination: destination, length: end + 1)
    }

    /// A decimal port without leading zeros or signs.
    private static func port(_ text: String) -> UInt16? {
        guard !text.isEmpty, text.count <= 5, text.allSatisfy({ $0.isASCII && $0.isNumber }),
              text == "0" || !text.hasPrefix("0"), let value = UInt16(text) else { return nil }
        return value
    }

    private static func address(_ text: String, port: UInt16, v6: Bool) -> SocketAddress? {
        guard v6 == text.contains(":"), let address = try? SocketAddress(host: text, port: port) else { return nil }
        return address.family == (v6 ? AF_INET6 : AF_INET) ? address : nil
    }

    // MARK: v2

    private static func parseV2(_ bytes: UnsafeRawBufferPointer) -> Outcome {
        for (index, byte) in v2Signature.enumerated() where index < bytes.count {
            if bytes[index] != byte { return .invalid("not a PROXY protocol header") }
        }
        guard bytes.count >= 16 else { return .incomplete }
        let versionCommand = bytes[12]
        guard versionCommand >> 4 == 2 else { return .invalid("PROXY v2 version \(versionCommand >> 4)") }
        let command = versionCommand & 0x0F
        guard command <= 1 else { return .invalid("PROXY v2 command \(command)") }
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        guard bytes.count >= 16 + length else { return .incomplete }
        let total = 16 + length
        if command == 0 { return .complete(source: nil, destination: nil, length: total) }  // LOCAL
        let body = UnsafeRawBufferPointer(rebasing: bytes[16..<total])
        switch bytes[13] {
        case 0x11:  // TCP over IPv4
            guard body.count >= 12 else { return .invalid("PROXY v2 TCP4 block of \(body.count) bytes") }
            let source = SocketAddress(ipv4: (body[0], body[1], body[2], body[3]), port: UInt16(body[8]) << 8 | UInt16(body[9]))
            let destination = SocketAddress(ipv4: (body[4], body[5], body[6], body[7]), port: UInt16(body[10]) << 8 | UInt16(body[11]))
            return .complete(source: source, destination: destination, length: total)
        case 0x21:  // TCP over IPv6
            guard body.count >= 36 else { return .invalid("PROXY v2 TCP6 block of \(body.count) bytes") }
            let source = ipv6(body, at: 0, port: UInt16(body[32]) << 8 | UInt16(body[33]))
            let destination = ipv6(body, at: 16, port: UInt16(body[34]) << 8 | UInt16(body[35]))
            return .complete(source: source, destination: destination, length: total)
        default:
            return .complete(source: nil, destination: nil, length: total)
        }
    }

    private static func ipv6(_ body: UnsafeRawBufferPointer, at offset: Int, port: UInt16) -> SocketAddress? {
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &address.sin6_addr) { target in
            target.copyMemory(from: UnsafeRawBufferPointer(rebasing: body[offset..<(offset + 16)]))
        }
        var raw = sockaddr_storage()
        withUnsafeMutableBytes(of: &raw) { $0.storeBytes(of: address, as: sockaddr_in6.self) }
        return SocketAddress(raw)
    }
}

/// Writes a PROXY protocol header (HAProxy's doc/proxy-protocol.txt), what a proxy with
/// `send-proxy` sends a backend before the client's first byte. Pure.
public enum ProxyHeaderEncoder {
    /// The longest header written: a v1 line for two IPv6 addresses (107 bytes) or a v2 IPv6
    /// block (52).
    public static let maximumLength = 108

    /// The header naming `source` (the client) and `destination` (the address it connected to);
    /// with either unknown, or of different families: v1 `UNKNOWN`, v2 `LOCAL`.
    public static func encode(v2: Bool, source: SocketAddress?, destination: SocketAddress?) -> [UInt8] {
        let known = source.flatMap { source in destination.map { (source, $0) } }.flatMap { pair in
            pair.0.family == pair.1.family ? pair : nil
        }
        if !v2 {
            guard let (source, destination) = known else { return Array("PROXY UNKNOWN\r\n".utf8) }
            let family = source.family == AF_INET6 ? "TCP6" : "TCP4"
            return Array("PROXY \(family) \(source.host) \(destination.host) \(source.port) \(destination.port)\r\n".utf8)
        }
        var bytes = ProxyHeaderParser.v2Signature
        guard let (source, destination) = known else { return bytes + [0x20, 0x00, 0x00, 0x00] }
        let six = source.family == AF_INET6
        bytes += [0x21, six ? 0x21 : 0x11, 0x00, six ? 36 : 12]
        bytes += addressBytes(source) + addressBytes(destination)
        bytes += [UInt8(source.port >> 8), UInt8(source.port & 0xFF), UInt8(destination.port >> 8), UInt8(destination.port & 0xFF)]
        return bytes
    }

    /// The address's bytes in network order (4 or 16).
    static func addressBytes(_ address: SocketAddress) -> [UInt8] {
        address.withSockAddr { pointer, _ in
            if address.family == AF_INET6 {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { six in
                    withUnsafeBytes(of: six.pointee.sin6_addr) { Array($0) }
                }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { four in
                withUnsafeBytes(of: four.pointee.sin_addr) { Array($0) }
            }
        }
    }
}
