@testable import BerthRegistry
import BerthEngine
import BerthSystem
@testable import BerthDiscovery
import XCTest

/// 100,000 random values put through the catalog: no crash, and every malformed one counted.
final class FuzzTests: XCTestCase {
    /// SplitMix64: a fixed seed makes a failure reproducible.
    private struct Random {
        var state: UInt64
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
        mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8(truncatingIfNeeded: next()) } }
    }

    private enum Kind: CaseIterable {
        case randomBytes, truncatedJSON, mutatedJSON, hugeNumber, wrongType, deepNesting, hostPortNoise, valid
    }

    /// A value of `kind`, and whether it must be malformed whatever the parser thinks.
    private func value(_ kind: Kind, _ random: inout Random) -> (bytes: [UInt8], mustFail: Bool) {
        let good = Array(#"{"host":"10.0.\#(random.below(256)).\#(random.below(256))","port":\#(1 + random.below(65535)),"listen":\#(1 + random.below(65535)),"tags":["a"],"meta":{"k":"v"},"draining":false}"#.utf8)
        switch kind {
        case .randomBytes:
            return (random.bytes(random.below(48)), false)
        case .truncatedJSON:
            // A JSON object cut anywhere before its closing brace never parses.
            return (Array(good.prefix(random.below(good.count))), true)
        case .mutatedJSON:
            var mutated = good
            for _ in 0...random.below(3) {
                let index = random.below(mutated.count)
                switch random.below(3) {
                case 0: mutated[index] = UInt8(truncatingIfNeeded: random.next())
                case 1: mutated.remove(at: index)
                default: mutated.insert(UInt8(truncatingIfNeeded: random.next()), at: index)
                }
            }
            return (mutated, false)
        case .hugeNumber:
            let numbers = ["1e999", "-1e999", "123456789012345678901234567890", "9223372036854775808", "-9223372036854775809",
                           "65536", "0", "-1", "1.5", "4294967297", "NaN", "Infinity", "0x50"]
            let number = numbers[random.below(numbers.count)]
            let field = ["port", "listen", "weight"][random.below(3)]
            let text = field == "port" ? #"{"host":"h","port":\#(number)}"# : #"{"host":"h","port":80,"\#(field)":\#(number)}"#
            // Weight 0 is allowed (HAProxy's "no traffic"); every other combination is out of range or no integer.
            return (Array(text.utf8), !(field == "weight" && number == "0"))
        case .wrongType:
            // Every one is a known field with a value of another JSON type (never null: absent).
            let notString = ["80", "true", "[80]", "{\"a\":1}", "80.25"]
            let notInteger = ["\"80\"", "true", "[80]", "{\"a\":1}", "80.25"]
            let notBool = ["\"yes\"", "1", "[true]", "{}"]
            let texts = [#"{"host":\#(notString[random.below(notString.count)]),"port":80}"#,
                         #"{"host":"h","port":\#(notInteger[random.below(notInteger.count)])}"#,
                         #"{"host":"h","port":80,"tags":[\#(notString[random.below(notString.count)])]}"#,
                         #"{"host":"h","port":80,"meta":{"k":\#(notString[random.below(notString.count)])}}"#,
                         #"{"host":"h","port":80,"draining":\#(notBool[random.below(notBool.count)])}"#]
            return (Array(texts[random.below(texts.count)].utf8), true)
        case .deepNesting:
            let depth = 1 + random.below(2 * JSONValue.maximumDepth)
            let open = random.below(2) == 0 ? "[" : "{\"a\":"
            let close = open == "[" ? "]" : "}"
            let nested = String(repeating: open, count: depth) + "1" + String(repeating: close, count: depth)
            // Either the whole value (never an object with host and port) or an unknown field.
            if random.below(2) == 0 { return (Array(nested.utf8), true) }
            return (Array(#"{"host":"h","port":80,"x":\#(nested)}"#.utf8), false)
        case .hostPortNoise:
            let hosts = ["10.0.0.1", "[::1]", "::1", "", "*", "a b", "[", "]", "name", "300.1.1.1", "[fe80::1%eth0]"]
            let ports = ["80", "0", "65536", "", "-1", "8o", "99999999999999999999", " 80"]
            let text = "\(hosts[random.below(hosts.count)]):\(ports[random.below(ports.count)])"
            return (Array(text.utf8), false)
        case .valid:
            return (good, false)
        }
    }

    func testOneHundredThousandRandomValues() {
        var random = Random(state: 0x5EED_BE27)
        var catalog = Catalog(options: Catalog.Options(defaultListen: 8000))
        let layout = catalog.options.layout
        var expectedMalformed: UInt64 = 0
        var expectedByReason: [MalformedReason: UInt64] = [:]
        var model: [String: [String: InstanceRecord]] = [:]
        var kinds: [Kind: Int] = [:]
        let total = 100_000
        for revision in 1...total {
            let kind = Kind.allCases[random.below(Kind.allCases.count)]
            kinds[kind, default: 0] += 1
            let (bytes, mustFail) = value(kind, &random)
            let service = "svc\(random.below(20))/x"
            let instance = "i\(random.below(10))"
            let key = try! layout.instanceKey(service: service, instance: instance)
            let outcome = catalog.apply(put: key, value: bytes, revision: Int64(revision))
            switch outcome {
            case .malformed(let entry, _):
                expectedMalformed += 1
                expectedByReason[entry.reason, default: 0] += 1
                model[service]?.removeValue(forKey: instance)
                // The catalog's verdict is the parser's, and the reason is the parser's.
                do throws(ValueError) {
                    _ = try InstanceRecord.parse(bytes)
                    XCTFail("the catalog counted a value that parses")
                } catch {
                    if entry.reason != .value(error.reason) { XCTFail("\(entry.reason) != \(error.reason)") }
                }
            case .changed, .unchanged:
                if mustFail { XCTFail("\(kind): \(String(decoding: bytes.prefix(200), as: UTF8.self)) was accepted") }
                model[service, default: [:]][instance] = try? InstanceRecord.parse(bytes)
            case .stale, .ignored:
                XCTFail("\(outcome) for a new revision under the prefix")
            }
            if revision % 10_000 == 0 {
                _ = catalog.routingTable(bind: try! SocketAddress(host: "127.0.0.1", port: 0), now: Int64(revision))
            }
        }
        XCTAssertEqual(catalog.malformed.total, expectedMalformed)
        XCTAssertEqual(catalog.malformed.byReason, expectedByReason)
        XCTAssertEqual(catalog.malformed.byReason.values.reduce(0, +), catalog.malformed.total)
        XCTAssertEqual(catalog.malformed.recent.count, 64)
        XCTAssertEqual(catalog.revision, Int64(total))
        // What is left is exactly the last good value of every key.
        XCTAssertEqual(catalog.services.mapValues(\.instances), model.filter { !$0.value.isEmpty })
        // Each of the 200 keys holds either a good instance or a malformed value now.
        XCTAssertEqual(catalog.malformedKeys.count + catalog.instanceCount, 200)
        XCTAssertGreaterThan(expectedMalformed, UInt64(total / 2))
        XCTAssertLessThan(expectedMalformed, UInt64(total))
        let build = catalog.routingTable(bind: try! SocketAddress(host: "127.0.0.1", port: 0), now: 0)
        XCTAssertNil(build.table.validationError())
        print("fuzz: \(total) values, \(expectedMalformed) malformed; by reason: "
              + catalog.malformed.byReason.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: ", ")
              + "; kinds: " + kinds.map { "\($0.key)=\($0.value)" }.sorted().joined(separator: ", "))
    }

    func testRandomKeysAndConfigValues() {
        var random = Random(state: 42)
        var catalog = Catalog()
        let alphabet = Array("/_%2Fab5xport_config".utf8)
        var malformed: UInt64 = 0
        for revision in 1...20_000 {
            var key = "/backends/"
            for _ in 0..<random.below(12) { key.append(Character(UnicodeScalar(alphabet[random.below(alphabet.count)]))) }
            let value: [UInt8] = random.below(2) == 0 ? random.bytes(random.below(16))
                : Array(#"{"listen":\#(random.below(70_000)),"retries":\#(random.below(200)),"linger":"\#(random.below(9))s"}"#.utf8)
            let outcome = random.below(4) == 0 ? catalog.apply(delete: key, revision: Int64(revision))
                : catalog.apply(put: key, value: value, revision: Int64(revision))
            if case .malformed = outcome { malformed += 1 }
        }
        XCTAssertEqual(catalog.malformed.total, malformed)
        XCTAssertEqual(catalog.malformed.byReason.values.reduce(0, +), malformed)
        _ = catalog.routingTable(bind: try! SocketAddress(host: "0.0.0.0", port: 0), now: 0)
    }
}
