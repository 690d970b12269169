/// RFC 3986 percent-encoding of one URI component (a query value, a path segment), for the
/// control plane's HTTP clients and server (the Docker API, `berth ctl`, the admin API's
/// paths). Not used by the data plane. `encode` turns every UTF-8 byte but the
/// unreserved ones (ALPHA, DIGIT, `-`, `.`, `_`, `~`) and those in `keeping` becomes `%XX`.
/// (Foundation's `addingPercentEncoding` needs `CharacterSet`, from the Foundation that Berth
/// keeps out of its binary.)
public enum PercentEncoding {
    /// Sub-delimiters and `:` `@`, which a path segment may hold as they are (RFC 3986 `pchar`),
    /// without `;` (HAProxy-style paths such as `/;csv` give it a meaning).
    public static let pathSegmentExtras = "!$&'()*+,=:@"

    public static func encode(_ text: String, keeping extras: String = "") -> String {
        let kept = Set(extras.utf8)
        let hex = Array("0123456789ABCDEF".utf8)
        var output: [UInt8] = []
        output.reserveCapacity(text.utf8.count)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                output.append(byte)
            case _ where kept.contains(byte):
                output.append(byte)
            default:
                output += [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0x0F)]]
            }
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// Decodes `%XX` escapes; nil when an escape is malformed or the bytes are not UTF-8.
    public static func decode(_ text: String) -> String? {
        guard text.utf8.contains(UInt8(ascii: "%")) else { return text }
        return decodeBytes(text.utf8).flatMap { String(validating: $0, as: UTF8.self) }
    }

    /// The bytes `%XX` escapes stand for; nil when an escape is malformed.
    public static func decodeBytes(_ text: some Sequence<UInt8>) -> [UInt8]? {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.underestimatedCount)
        var iterator = text.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = iterator.next().flatMap(hexValue), let low = iterator.next().flatMap(hexValue) else { return nil }
            bytes.append(high << 4 | low)
        }
        return bytes
    }

    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        default: nil
        }
    }
}
