import Glibc

/// Number and text formatting for the report (no Foundation in this target).
enum Format {
    /// `value` rounded to `digits` decimals: `fixed(3.14159, 2) == "3.14"`; "-" when not finite.
    static func fixed(_ value: Double, _ digits: Int) -> String {
        guard value.isFinite else { return "-" }
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let scaled = (abs(value) * scale).rounded()
        guard scaled < 9e18 else { return "\(value)" }
        let units = UInt64(scaled)
        let divisor = UInt64(scale)
        var text = "\(units / divisor)"
        if digits > 0 {
            let fraction = "\(units % divisor)"
            text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
        }
        return (value < 0 && units != 0 ? "-" : "") + text
    }

    /// An integer with thousands separators: `1,234,567`.
    static func grouped(_ value: UInt64) -> String {
        let digits = Array("\(value)")
        var text = ""
        for (index, digit) in digits.enumerated() {
            if index > 0 && (digits.count - index) % 3 == 0 { text.append(",") }
            text.append(digit)
        }
        return text
    }

    /// A rate rounded to an integer, grouped.
    static func rate(_ value: Double) -> String {
        guard value.isFinite, value >= 0 else { return "-" }
        return grouped(UInt64(value.rounded()))
    }

    /// A ratio as `0.93x`.
    static func ratio(_ value: Double?) -> String {
        guard let value, value.isFinite else { return "-" }
        return fixed(value, 2) + "x"
    }

    /// `text` padded with spaces to `width` characters, on the left (numbers) or the right (labels).
    static func pad(_ text: String, _ width: Int, alignRight: Bool = true) -> String {
        let padding = String(repeating: " ", count: max(0, width - text.count))
        return alignRight ? padding + text : text + padding
    }
}

/// A JSON value, rendered by hand (keys keep their insertion order).
indirect enum JSONValue {
    case number(Double)
    case integer(Int64)
    case string(String)
    case bool(Bool)
    case null
    case array([JSONValue])
    case object([(String, JSONValue)])

    static func optional(_ value: Double?) -> JSONValue {
        guard let value, value.isFinite else { return .null }
        return .number(value)
    }

    func rendered(indent: Int = 0) -> String {
        let inner = String(repeating: "  ", count: indent + 1)
        let outer = String(repeating: "  ", count: indent)
        switch self {
        case .number(let value):
            guard value.isFinite else { return "null" }
            if value == value.rounded() && abs(value) < 1e15 { return "\(Int64(value))" }
            return Format.fixed(value, 6).trimmingTrailingZeros
        case .integer(let value):
            return "\(value)"
        case .string(let text):
            return JSONValue.quoted(text)
        case .bool(let value):
            return value ? "true" : "false"
        case .null:
            return "null"
        case .array(let values):
            if values.isEmpty { return "[]" }
            return "[\n" + values.map { inner + $0.rendered(indent: indent + 1) }.joined(separator: ",\n") + "\n" + outer + "]"
        case .object(let members):
            if members.isEmpty { return "{}" }
            return "{\n" + members.map { inner + JSONValue.quoted($0.0) + ": " + $0.1.rendered(indent: indent + 1) }
                .joined(separator: ",\n") + "\n" + outer + "}"
        }
    }

    private static func quoted(_ text: String) -> String {
        var result = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            case "\n": result += "\\n"
            case "\t": result += "\\t"
            case "\r": result += "\\r"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    result += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    result.unicodeScalars.append(scalar)
                }
            }
        }
        return result + "\""
    }
}

extension String {
    /// `"1.500000"` → `"1.5"`; `"2.000"` → `"2"`.
    var trimmingTrailingZeros: String {
        guard contains(".") else { return self }
        var text = self
        while text.hasSuffix("0") { text.removeLast() }
        if text.hasSuffix(".") { text.removeLast() }
        return text
    }
}

/// Progress and diagnostics go to stderr, one write per line, so they never mix with the
/// table or the JSON on stdout.
func progress(_ message: String) {
    var line = "bench: \(message)\n"
    line.withUTF8 { _ = Glibc.write(2, $0.baseAddress, $0.count) }
}

/// Writes `text` to stdout in one go (the table, the JSON, a role's announcement).
func writeOut(_ text: String) {
    var text = text
    text.withUTF8 { buffer in
        var offset = 0
        var attempts = 0
        while offset < buffer.count && attempts < 1_000 {
            attempts += 1
            let written = Glibc.write(1, buffer.baseAddress! + offset, buffer.count - offset)
            if written > 0 {
                offset += written
            } else if written < 0 && errno != EINTR && errno != EAGAIN {
                return
            }
        }
    }
}
