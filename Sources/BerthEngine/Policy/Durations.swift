/// Durations written as HAProxy writes them: a number and a unit, `us`, `ms`, `s`, `m`, `h`, `d`;
/// a bare number is milliseconds (HAProxy's default for timeouts). Pure: no clock, no Glibc.
public enum DurationText {
    /// Parses `text` into whole milliseconds (microseconds round up to 1 ms).
    public static func milliseconds(_ text: String) throws(DurationError) -> Int64 {
        let trimmed = text.trimmingSpaces()
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        let unit = trimmed.dropFirst(digits.count)
        guard !digits.isEmpty, let value = Int64(digits) else {
            throw DurationError(text: text)
        }
        let scale: (multiply: Int64, divide: Int64)
        switch unit {
        case "us": scale = (1, 1000)
        case "", "ms": scale = (1, 1)
        case "s": scale = (1000, 1)
        case "m": scale = (60_000, 1)
        case "h": scale = (3_600_000, 1)
        case "d": scale = (86_400_000, 1)
        default: throw DurationError(text: text)
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: scale.multiply)
        guard !overflow else { throw DurationError(text: text) }
        if scale.divide > 1 {
            return product == 0 ? 0 : max(1, (product + scale.divide - 1) / scale.divide)
        }
        return product
    }

    /// Writes milliseconds back the way HAProxy would (`1m`, `2s`, `250ms`).
    public static func format(milliseconds: Int64) -> String {
        if milliseconds != 0 && milliseconds % 86_400_000 == 0 { return "\(milliseconds / 86_400_000)d" }
        if milliseconds != 0 && milliseconds % 3_600_000 == 0 { return "\(milliseconds / 3_600_000)h" }
        if milliseconds != 0 && milliseconds % 60_000 == 0 { return "\(milliseconds / 60_000)m" }
        if milliseconds != 0 && milliseconds % 1000 == 0 { return "\(milliseconds / 1000)s" }
        return "\(milliseconds)ms"
    }
}

public struct DurationError: Error, CustomStringConvertible, Sendable, Equatable {
    public let text: String
    public var description: String {
        "invalid duration '\(text)': write a number with a unit, as 200ms, 2s, 1m, 1h (a bare number is ms)"
    }
}

extension String {
    func trimmingSpaces() -> Substring {
        var slice = self[...]
        while slice.first == " " || slice.first == "\t" { slice = slice.dropFirst() }
        while slice.last == " " || slice.last == "\t" { slice = slice.dropLast() }
        return slice
    }
}
