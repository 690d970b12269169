/// Durations written as HAProxy writes them: a number and a unit, `us`, `ms`, `s`, `m`, `h`, `d`;
/// a bare number is milliseconds (HAProxy's default for timeouts). Pure: no clock, no Glibc.
public enum DurationText {
    /// The longest duration accepted anywhere (flags, the registry): HAProxy's, 2^31 - 1 ms
    /// (24.8 days). Longer values are refused rather than wrapped into "at once".
    public static let maximum: Int64 = 2_147_483_647

    /// Parses `text` into whole milliseconds (microseconds round up to 1 ms), at most `maximum`.
    public static func milliseconds(_ text: String) throws(DurationError) -> Int64 {
        let trimmed = text.trimmingSpaces()
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        let unit = trimmed.dropFirst(digits.count)
        guard !digits.isEmpty else { throw DurationError(text: text) }
        guard let value = Int64(digits) else { throw DurationError(text: text, tooLong: true) }
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
        guard !overflow else { throw DurationError(text: text, tooLong: true) }
        let result = scale.divide > 1 && product != 0 ? max(1, (product + scale.divide - 1) / scale.divide) : product
        guard result <= maximum else { throw DurationError(text: text, tooLong: true) }
        return result
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
    /// Well formed, but longer than `DurationText.maximum`.
    public var tooLong = false

    public init(text: String, tooLong: Bool = false) {
        self.text = text
        self.tooLong = tooLong
    }

    public var description: String {
        tooLong
            ? "invalid duration '\(text)': at most 24d (\(DurationText.maximum)ms)"
            : "invalid duration '\(text)': write a number with a unit, as 200ms, 2s, 1m, 1h (a bare number is ms)"
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
