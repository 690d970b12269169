/// The parts of an HTTP/1.x request head that whoami and the stats server act on. Pure: parses
/// bytes, no I/O.
public struct RequestHead: Equatable, Sendable {
    public var method: String
    public var target: String
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    public var minorVersion: Int
    public var contentLength: Int
    public var keepAlive: Bool
    public var chunked: Bool
    /// The Authorization header's value, if any.
    public var authorization: String?

    public enum ParseResult: Equatable {
        /// A complete head of `length` bytes (through the blank line).
        case complete(RequestHead, length: Int)
        /// More bytes are needed.
        case incomplete
        /// Not HTTP/1.x, or a malformed line: answer 400 and close.
        case invalid(String)
        /// The head is longer than `maximumHeadLength`: answer 431 and close.
        case tooLarge
    }

    /// Largest head accepted; past it the request is rejected (431).
    public static let maximumHeadLength = 8192
    /// Most header lines accepted; past it the request is rejected (431).
    public static let maximumHeaderCount = 100

    /// Parses the head at the start of `bytes`.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> ParseResult {
        guard let end = headEnd(bytes) else {
            if bytes.count > maximumHeadLength { return .tooLarge }
            // A request line that already cannot be HTTP: fail before waiting for more.
            if let first = bytes.first, !(first >= 0x41 && first <= 0x5A) && first != 0x0D && first != 0x0A {
                return .invalid("not an HTTP request")
            }
            return .incomplete
        }
        guard end <= maximumHeadLength else { return .tooLarge }
        var lines = [Substring]()
        let text = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[0..<end]), as: UTF8.self)
        for line in text.split(separator: "\r\n", omittingEmptySubsequences: false) { lines.append(line) }
        while lines.first?.isEmpty == true { lines.removeFirst() }  // tolerate leading CRLFs
        guard let requestLine = lines.first else { return .invalid("empty request") }
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, !parts[0].isEmpty, !parts[1].isEmpty,
              parts[0].allSatisfy({ $0.isASCII && ($0.isUppercase || $0 == "-") }) else {
            return .invalid("malformed request line")
        }
        let minor: Int
        switch parts[2] {
        case "HTTP/1.1": minor = 1
        case "HTTP/1.0": minor = 0
        default: return .invalid("unsupported protocol version")
        }
        var head = RequestHead(
            method: String(parts[0]), target: String(parts[1]), minorVersion: minor,
            contentLength: 0, keepAlive: minor == 1, chunked: false)
        var headerCount = 0
        for line in lines.dropFirst() where !line.isEmpty {
            headerCount += 1
            guard headerCount <= maximumHeaderCount else { return .tooLarge }
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else { return .invalid("malformed header line") }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters()
            switch name {
            case "content-length":
                guard let length = Int(value), length >= 0 else { return .invalid("bad Content-Length") }
                head.contentLength = length
            case "authorization":
                head.authorization = String(value)
            case "transfer-encoding":
                head.chunked = value.lowercased().contains("chunked")
            case "connection":
                let tokens = value.lowercased()
                if tokens.contains("close") { head.keepAlive = false }
                if tokens.contains("keep-alive") { head.keepAlive = true }
            default:
                break
            }
        }
        return .complete(head, length: end)
    }

    /// Index just past the first CRLFCRLF, if any.
    static func headEnd(_ bytes: UnsafeRawBufferPointer) -> Int? {
        guard bytes.count >= 4 else { return nil }
        var index = 3
        while index < bytes.count {
            if bytes[index] == 0x0A && bytes[index - 1] == 0x0D && bytes[index - 2] == 0x0A && bytes[index - 3] == 0x0D {
                return index + 1
            }
            index += 1
        }
        return nil
    }
}

extension Substring {
    func trimmingCharacters() -> Substring {
        var slice = self
        while slice.first == " " || slice.first == "\t" { slice = slice.dropFirst() }
        while slice.last == " " || slice.last == "\t" { slice = slice.dropLast() }
        return slice
    }
}
