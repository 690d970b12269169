import ArgumentParser
import BerthEngine
import BerthRegistry
import BerthSystem

/// `HOST:PORT` on the command line (IPv4, `[IPv6]`, `*`/empty host for all addresses).
/// Parsed through `@Option(transform:)` so that a bad value's reason reaches the user.
struct AddressArgument: Sendable {
    let address: SocketAddress

    static func parse(_ text: String) throws -> AddressArgument {
        do {
            return AddressArgument(address: try SocketAddress(parsing: text.trimmed))
        } catch {
            throw ValidationError(error.description)
        }
    }
}

/// A list of `HOST:PORT`, repeatable and comma separated: `--backend a:1,b:2 --backend c:3`.
struct AddressListArgument: Sendable {
    let addresses: [SocketAddress]
    /// Each address's weight: `HOST:PORT*WEIGHT` (0 to 256, HAProxy's `weight`), 1 without one.
    let weights: [Int]

    static func parse(_ text: String) throws -> AddressListArgument {
        let items = text.split(separator: ",", omittingEmptySubsequences: true)
        guard !items.isEmpty else { throw ValidationError("invalid address list '\(text)': expected HOST:PORT[*WEIGHT][,HOST:PORT...]") }
        var addresses: [SocketAddress] = []
        var weights: [Int] = []
        for item in items {
            let parts = item.split(separator: "*", maxSplits: 1, omittingEmptySubsequences: false)
            addresses.append(try AddressArgument.parse(String(parts[0])).address)
            if parts.count == 2 {
                guard let weight = Int(parts[1]), (0...256).contains(weight) else {
                    throw ValidationError("invalid weight in '\(item)': expected HOST:PORT*WEIGHT with a weight from 0 to 256")
                }
                weights.append(weight)
            } else {
                weights.append(1)
            }
        }
        return AddressListArgument(addresses: addresses, weights: weights)
    }

    /// The backends named as their address, with their weights.
    var backends: [Backend] {
        zip(addresses, weights).map { Backend(name: $0.description, address: $0, weight: $1) }
    }
}

/// A duration as HAProxy writes it: `200ms`, `2s`, `1m` (bare numbers are ms).
struct DurationArgument: Sendable, CustomStringConvertible {
    let milliseconds: Int64

    init(milliseconds: Int64) {
        self.milliseconds = milliseconds
    }

    static func parse(_ text: String) throws -> DurationArgument {
        do {
            return DurationArgument(milliseconds: try DurationText.milliseconds(text))
        } catch {
            throw ValidationError(error.description)
        }
    }

    var description: String { DurationText.format(milliseconds: milliseconds) }
}

extension RelayMode: ExpressibleByArgument {}
extension ConnectionLogFormat: ExpressibleByArgument {}
extension BalanceMode: ExpressibleByArgument {}

/// Validation messages that say what is wrong with which flag, on one line.
func invalid(_ flag: String, _ text: String, _ expectation: String) -> ValidationError {
    ValidationError("invalid value '\(text)' for \(flag): \(expectation)")
}

extension String {
    var trimmed: String {
        var slice = self[...]
        while slice.first?.isWhitespace == true { slice = slice.dropFirst() }
        while slice.last?.isWhitespace == true { slice = slice.dropLast() }
        return String(slice)
    }
}

/// Every flag that can also come from the environment: flag → variable. A variable fills its
/// flag only when the flag is absent from the command line.
/// A flag may be listed under several variables: each one set is appended, so the last one
/// listed wins. `switches` are flags without a value, set by a variable that is `1`, `true` or
/// `yes`.
struct EnvironmentFlags {
    let command: String
    let flags: [(flag: String, variable: String)]
    var switches: [(flag: String, variable: String)] = []

    /// Appends `--flag value` for each variable set and flag not given.
    func apply(to arguments: [String], environment: [String: String]) -> [String] {
        var result = arguments
        for (flag, variable) in flags {
            guard let value = environment[variable], !value.isEmpty else { continue }
            let given = arguments.contains { $0 == flag || $0.hasPrefix(flag + "=") }
            if !given { result += [flag, value] }
        }
        for (flag, variable) in switches {
            guard let value = environment[variable], ["1", "true", "yes"].contains(value.lowercased()) else { continue }
            if !result.contains(flag) { result.append(flag) }
        }
        return result
    }

    /// The `--help` line naming the variable.
    static func help(_ text: String, _ variable: String) -> ArgumentHelp {
        ArgumentHelp("\(text) (env: \(variable))")
    }
}
