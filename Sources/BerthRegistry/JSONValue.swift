import BerthSystem

/// A parsed JSON document, for reading registry values field by field with a reason for every
/// wrong type. Numbers keep integers exact (`integer`) apart from everything else (`number`).
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Values larger than this are rejected before parsing: a registry value is a few hundred
    /// bytes, and the bound keeps one bad put from costing much.
    public static let maximumBytes = 64 * 1024
    /// Arrays and objects nested deeper than this are rejected (registry values are shallow;
    /// the bound keeps the recursive parser's stack small).
    public static let maximumDepth = 32

    /// Parses `bytes` as one JSON document (RFC 8259). Errors say why in words.
    public static func parse(_ bytes: [UInt8]) throws(ValueError) -> JSONValue {
        guard bytes.count <= maximumBytes else {
            throw ValueError(.tooLarge, "\(bytes.count) bytes (limit \(maximumBytes))")
        }
        var parser = JSONParser(bytes: bytes)
        return try parser.document()
    }

    public var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .integer, .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// A recursive-descent JSON parser over bytes: strict RFC 8259 (no comments, no trailing
/// commas, no NaN), strings validated as UTF-8, depth bounded. Duplicate keys: the last wins.
private struct JSONParser {
    let bytes: [UInt8]
    var index = 0

    init(bytes: [UInt8]) {
        self.bytes = bytes
    }

    mutating func document() throws(ValueError) -> JSONValue {
        let value = try self.value(depth: 0)
        skipWhiteSpace()
        guard index == bytes.count else { throw failure("unexpected bytes after the value") }
        return value
    }

    private func failure(_ detail: String) -> ValueError {
        ValueError(.notJSON, "not valid JSON: \(detail) at byte \(index)")
    }

    private mutating func skipWhiteSpace() {
        while index < bytes.count, InstanceRecord.isWhiteSpace(bytes[index]) { index += 1 }
    }

    private mutating func value(depth: Int) throws(ValueError) -> JSONValue {
        skipWhiteSpace()
        guard index < bytes.count else { throw failure("unexpected end") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default: throw failure("unexpected character")
        }
    }

    private mutating func literal(_ word: String) throws(ValueError) {
        for expected in word.utf8 {
            guard index < bytes.count else { throw failure("unexpected end") }
            guard bytes[index] == expected else { throw failure("unexpected character") }
            index += 1
        }
    }

    private mutating func object(depth: Int) throws(ValueError) -> JSONValue {
        guard depth <= JSONValue.maximumDepth else { throw failure("nested deeper than \(JSONValue.maximumDepth)") }
        index += 1
        var fields: [String: JSONValue] = [:]
        skipWhiteSpace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "}") { index += 1; return .object(fields) }
        while true {
            skipWhiteSpace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw failure("expected a field name") }
            let name = try string()
            skipWhiteSpace()
            guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw failure("expected ':'") }
            index += 1
            fields[name] = try value(depth: depth)
            skipWhiteSpace()
            guard index < bytes.count else { throw failure("unexpected end") }
            if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
            guard bytes[index] == UInt8(ascii: "}") else { throw failure("expected ',' or '}'") }
            index += 1
            return .object(fields)
        }
    }

    private mutating func array(depth: Int) throws(ValueError) -> JSONValue {
        guard depth <= JSONValue.maximumDepth else { throw failure("nested deeper than \(JSONValue.maximumDepth)") }
        index += 1
        var items: [JSONValue] = []
        skipWhiteSpace()
        if index < bytes.count, bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
        while true {
            items.append(try value(depth: depth))
            skipWhiteSpace()
            guard index < bytes.count else { throw failure("unexpected end") }
            if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
            guard bytes[index] == UInt8(ascii: "]") else { throw failure("expected ',' or ']'") }
            index += 1
            return .array(items)
        }
    }

    private mutating func string() throws(ValueError) -> String {
        index += 1
        var output: [UInt8] = []
        while true {
            guard index < bytes.count else { throw failure("unterminated string") }
            let byte = bytes[index]
            index += 1
            switch byte {
            case UInt8(ascii: "\""):
                guard let text = String(validating: output, as: UTF8.self) else { throw failure("string is not UTF-8") }
                return text
            case UInt8(ascii: "\\"):
                try escape(into: &output)
            case 0..<0x20:
                throw failure("control character in a string")
            default:
                output.append(byte)
            }
        }
    }

    private mutating func escape(into output: inout [UInt8]) throws(ValueError) {
        guard index < bytes.count else { throw failure("unterminated string") }
        let byte = bytes[index]
        index += 1
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): output.append(byte)
        case UInt8(ascii: "b"): output.append(0x08)
        case UInt8(ascii: "f"): output.append(0x0C)
        case UInt8(ascii: "n"): output.append(0x0A)
        case UInt8(ascii: "r"): output.append(0x0D)
        case UInt8(ascii: "t"): output.append(0x09)
        case UInt8(ascii: "u"):
            var scalar = try hexQuad()
            if (0xD800...0xDBFF).contains(scalar) {
                guard index + 1 < bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                    throw failure("lone surrogate")
                }
                index += 2
                let low = try hexQuad()
                guard (0xDC00...0xDFFF).contains(low) else { throw failure("lone surrogate") }
                scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
            }
            guard let unicode = Unicode.Scalar(scalar) else { throw failure("lone surrogate") }
            output.append(contentsOf: Array(String(Character(unicode)).utf8))
        default:
            throw failure("bad escape")
        }
    }

    private mutating func hexQuad() throws(ValueError) -> UInt32 {
        guard index + 4 <= bytes.count else { throw failure("short \\u escape") }
        var value: UInt32 = 0
        for _ in 0..<4 {
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw failure("bad \\u escape")
            }
            value = value << 4 | UInt32(digit)
            index += 1
        }
        return value
    }

    /// `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`: an exact `integer` when it has no
    /// fraction or exponent and fits in Int64, otherwise a `number`.
    private mutating func number() throws(ValueError) -> JSONValue {
        let start = index
        if bytes[index] == UInt8(ascii: "-") { index += 1 }
        guard index < bytes.count, isDigit(bytes[index]) else { throw failure("bad number") }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
        } else {
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        var integral = true
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            integral = false
            index += 1
            guard index < bytes.count, isDigit(bytes[index]) else { throw failure("bad number") }
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        if index < bytes.count, bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E") {
            integral = false
            index += 1
            if index < bytes.count, bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard index < bytes.count, isDigit(bytes[index]) else { throw failure("bad number") }
            while index < bytes.count, isDigit(bytes[index]) { index += 1 }
        }
        let text = String(decoding: bytes[start..<index], as: UTF8.self)
        if integral, let exact = Int64(text) { return .integer(exact) }
        guard let approximate = Double(text) else { throw failure("bad number") }
        return .number(approximate)
    }

    private func isDigit(_ byte: UInt8) -> Bool {
        byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")
    }
}

/// Field access on a JSON object, each failure a `ValueError` naming the field.
public struct JSONObject {
    public let fields: [String: JSONValue]

    public init(_ value: JSONValue, what: String) throws(ValueError) {
        guard case .object(let fields) = value else {
            throw ValueError(.notObject, "\(what) must be a JSON object, not \(value.typeName)")
        }
        self.fields = fields
    }

    /// nil when absent or null.
    public subscript(_ name: String) -> JSONValue? {
        if case .null = fields[name] { return nil }
        return fields[name]
    }

    public func integer(_ name: String, in range: ClosedRange<Int64>) throws(ValueError) -> Int64? {
        guard let value = self[name] else { return nil }
        guard case .integer(let number) = value else {
            throw ValueError(.wrongType, "'\(name)' must be an integer, not \(value.typeName)")
        }
        guard range.contains(number) else {
            throw ValueError(name == "port" || name == "listen" ? .badPort : .outOfRange,
                             "'\(name)' \(number) is not in \(range.lowerBound)...\(range.upperBound)")
        }
        return number
    }

    public func port(_ name: String) throws(ValueError) -> UInt16? {
        try integer(name, in: 1...65535).map { UInt16($0) }
    }

    public func string(_ name: String) throws(ValueError) -> String? {
        guard let value = self[name] else { return nil }
        guard case .string(let text) = value else {
            throw ValueError(.wrongType, "'\(name)' must be a string, not \(value.typeName)")
        }
        return text
    }

    public func bool(_ name: String) throws(ValueError) -> Bool? {
        guard let value = self[name] else { return nil }
        guard case .bool(let flag) = value else {
            throw ValueError(.wrongType, "'\(name)' must be true or false, not \(value.typeName)")
        }
        return flag
    }

    public func strings(_ name: String) throws(ValueError) -> [String]? {
        guard let value = self[name] else { return nil }
        guard case .array(let items) = value else {
            throw ValueError(.wrongType, "'\(name)' must be an array of strings, not \(value.typeName)")
        }
        var result: [String] = []
        for item in items {
            guard case .string(let text) = item else {
                throw ValueError(.wrongType, "'\(name)' must hold strings only, not \(item.typeName)")
            }
            result.append(text)
        }
        return result
    }

    public func stringMap(_ name: String) throws(ValueError) -> [String: String]? {
        guard let value = self[name] else { return nil }
        guard case .object(let items) = value else {
            throw ValueError(.wrongType, "'\(name)' must be an object of strings, not \(value.typeName)")
        }
        var result: [String: String] = [:]
        for (key, item) in items {
            guard case .string(let text) = item else {
                throw ValueError(.wrongType, "'\(name).\(key)' must be a string, not \(item.typeName)")
            }
            result[key] = text
        }
        return result
    }

    /// A duration as HAProxy writes it (`2s`, `500ms`, a bare number of ms) or a JSON number
    /// of milliseconds.
    public func duration(_ name: String) throws(ValueError) -> Int64? {
        guard let value = self[name] else { return nil }
        switch value {
        case .integer(let milliseconds) where milliseconds >= 0 && milliseconds <= DurationText.maximum:
            return milliseconds
        case .integer:
            throw ValueError(.badDuration, "'\(name)' must be from 0 to \(DurationText.maximum) ms")
        case .string(let text):
            do {
                return try DurationText.milliseconds(text)
            } catch {
                throw ValueError(.badDuration, "'\(name)': \(error.description)")
            }
        default:
            throw ValueError(.badDuration, "'\(name)' must be a duration such as \"2s\" or a number of ms, not \(value.typeName)")
        }
    }
}
