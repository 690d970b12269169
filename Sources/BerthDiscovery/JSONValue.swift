import BerthEngine
import Foundation

/// A parsed JSON document, for reading registry values field by field with a reason for every
/// wrong type. Numbers keep integers exact (`integer`) apart from everything else (`number`).
enum JSONValue: Sendable, Equatable, Decodable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// Values larger than this are rejected before parsing: a registry value is a few hundred
    /// bytes, and the bound keeps one bad put from costing much.
    static let maximumBytes = 64 * 1024

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null; return }
        // Foundation's decoder refuses a value of another JSON type, so the order only matters
        // for numbers: an exact integer first, then any other number.
        if let value = try? container.decode(Bool.self) { self = .bool(value); return }
        if let value = try? container.decode(Int64.self) { self = .integer(value); return }
        if let value = try? container.decode(Double.self) { self = .number(value); return }
        if let value = try? container.decode(String.self) { self = .string(value); return }
        if let value = try? container.decode([JSONValue].self) { self = .array(value); return }
        self = .object(try container.decode([String: JSONValue].self))
    }

    /// Parses `bytes` as one JSON document. Errors say why in words.
    static func parse(_ bytes: [UInt8]) throws(ValueError) -> JSONValue {
        guard bytes.count <= maximumBytes else {
            throw ValueError(.tooLarge, "\(bytes.count) bytes (limit \(maximumBytes))")
        }
        do {
            return try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch {
            throw ValueError(.notJSON, "not valid JSON")
        }
    }

    var typeName: String {
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

/// Field access on a JSON object, each failure a `ValueError` naming the field.
struct JSONObject {
    let fields: [String: JSONValue]

    init(_ value: JSONValue, what: String) throws(ValueError) {
        guard case .object(let fields) = value else {
            throw ValueError(.notObject, "\(what) must be a JSON object, not \(value.typeName)")
        }
        self.fields = fields
    }

    /// nil when absent or null.
    subscript(_ name: String) -> JSONValue? {
        if case .null = fields[name] { return nil }
        return fields[name]
    }

    func integer(_ name: String, in range: ClosedRange<Int64>) throws(ValueError) -> Int64? {
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

    func port(_ name: String) throws(ValueError) -> UInt16? {
        try integer(name, in: 1...65535).map { UInt16($0) }
    }

    func string(_ name: String) throws(ValueError) -> String? {
        guard let value = self[name] else { return nil }
        guard case .string(let text) = value else {
            throw ValueError(.wrongType, "'\(name)' must be a string, not \(value.typeName)")
        }
        return text
    }

    func bool(_ name: String) throws(ValueError) -> Bool? {
        guard let value = self[name] else { return nil }
        guard case .bool(let flag) = value else {
            throw ValueError(.wrongType, "'\(name)' must be true or false, not \(value.typeName)")
        }
        return flag
    }

    func strings(_ name: String) throws(ValueError) -> [String]? {
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

    func stringMap(_ name: String) throws(ValueError) -> [String: String]? {
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
    func duration(_ name: String) throws(ValueError) -> Int64? {
        guard let value = self[name] else { return nil }
        switch value {
        case .integer(let milliseconds) where milliseconds >= 0:
            return milliseconds
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
