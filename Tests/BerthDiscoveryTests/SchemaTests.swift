import BerthEngine
@testable import BerthRegistry
import BerthSystem
import BerthHealth
@testable import BerthDiscovery
import XCTest

/// Key layout, escaping, and value formats: pure, no etcd.
final class SchemaTests: XCTestCase {
    private func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

    func testEscapingRoundTripsAndIsOneSegment() {
        let names = ["whoami", "jwilder/whoami", "a%b", "100%/x//y", "_config", "_x", "x_y", "é/ü", "%2F", "registry:5000/app"]
        for name in names {
            let segment = KeySegment.encode(name)
            XCTAssertFalse(segment.contains("/"), segment)
            XCTAssertFalse(segment.hasPrefix("_"), segment)
            XCTAssertEqual(try KeySegment.decode(segment[...]).get(), name)
        }
        XCTAssertEqual(KeySegment.encode("jwilder/whoami"), "jwilder%2Fwhoami")
        XCTAssertEqual(KeySegment.encode("50%"), "50%25")
        XCTAssertEqual(KeySegment.encode("_config"), "%5Fconfig")
    }

    func testBadEscapesAreMalformedKeys() {
        XCTAssertEqual(KeySegment.decode("a%2"), .failure(.badEscape))
        XCTAssertEqual(KeySegment.decode("a%zz"), .failure(.badEscape))
        XCTAssertEqual(KeySegment.decode("%"), .failure(.badEscape))
        XCTAssertEqual(KeySegment.decode("%FF"), .failure(.notUTF8))
        XCTAssertEqual(KeySegment.decode("%41"), .failure(.nonCanonical), "A is never escaped")
        XCTAssertEqual(KeySegment.decode("a%2fb"), .failure(.nonCanonical), "upper-case hex only")
        XCTAssertEqual(KeySegment.decode(""), .failure(.emptySegment))
        let layout = RegistryLayout()
        XCTAssertEqual(layout.classify("/backends/a%2/x"), .malformed(KeyError(reason: .badEscape, key: "/backends/a%2/x")))
        XCTAssertEqual(layout.classify("/backends/a/x%"), .malformed(KeyError(reason: .badEscape, key: "/backends/a/x%")))
    }

    func testKeysAreClassified() {
        for prefix in ["/backends", "/backends/", "/backends//"] {
            let layout = RegistryLayout(prefix: prefix)
            XCTAssertEqual(layout.prefix, "/backends")
            XCTAssertEqual(layout.watchPrefix, "/backends/")
            XCTAssertEqual(layout.classify("/backends/whoami/736ab83847bb"), .instance(service: "whoami", instance: "736ab83847bb"))
            XCTAssertEqual(layout.classify("/backends/jwilder%2Fwhoami/c1"), .instance(service: "jwilder/whoami", instance: "c1"))
            XCTAssertEqual(layout.classify("/backends/whoami/port"), .port(service: "whoami"))
            XCTAssertEqual(layout.classify("/backends/_config/jwilder%2Fwhoami"), .config(service: "jwilder/whoami"))
            XCTAssertEqual(layout.classify("/backends2/whoami/x"), .ignored(.outsidePrefix))
            XCTAssertEqual(layout.classify("/other/whoami/x"), .ignored(.outsidePrefix))
            XCTAssertEqual(layout.classify("/backends/_future/x"), .ignored(.reservedService))
            XCTAssertEqual(layout.classify("/backends/%5Fx/i"), .instance(service: "_x", instance: "i"))
            for key in ["/backends/whoami", "/backends/a/b/c", "/backends/", "/backends/whoami/"] {
                guard case .malformed(let error) = layout.classify(key) else { return XCTFail("\(key) should be malformed") }
                XCTAssertTrue([.wrongDepth, .emptySegment].contains(error.reason), key)
            }
        }
        let root = RegistryLayout(prefix: "")
        XCTAssertEqual(root.classify("/svc/i"), .instance(service: "svc", instance: "i"))
        let custom = RegistryLayout(prefix: "/berth/prod")
        XCTAssertEqual(custom.classify("/berth/prod/svc/i"), .instance(service: "svc", instance: "i"))
    }

    func testKeyBuildersMatchClassify() throws {
        let layout = RegistryLayout()
        let key = try layout.instanceKey(service: "jwilder/whoami", instance: "abc/1")
        XCTAssertEqual(key, "/backends/jwilder%2Fwhoami/abc%2F1")
        XCTAssertEqual(layout.classify(key), .instance(service: "jwilder/whoami", instance: "abc/1"))
        XCTAssertEqual(layout.classify(layout.portKey(service: "a/b")), .port(service: "a/b"))
        XCTAssertEqual(layout.classify(layout.configKey(service: "_x")), .config(service: "_x"))
        XCTAssertThrowsError(try layout.instanceKey(service: "svc", instance: "port"))
        XCTAssertThrowsError(try layout.instanceKey(service: "", instance: "i"))
    }

    func testBerthJSONValues() throws {
        let full = try InstanceRecord.parse(bytes("""
            {"host":"127.0.0.5","port":32768,"listen":8000,"proto":"tcp","weight":1,"tags":["a","b"],
             "meta":{"image":"jwilder/whoami"},"draining":false,"future":{"x":[1,2]}}
            """))
        XCTAssertEqual(full, InstanceRecord(host: "127.0.0.5", port: 32768, listen: 8000, proto: "tcp", weight: 1,
                                            tags: ["a", "b"], meta: ["image": "jwilder/whoami"], draining: false))
        let minimal = try InstanceRecord.parse(bytes("  {\"host\":\"db.internal\",\"port\":5432}\n"))
        XCTAssertEqual(minimal, InstanceRecord(host: "db.internal", port: 5432))
        XCTAssertEqual(minimal.hostKind, .name)
        let v6 = try InstanceRecord.parse(bytes(#"{"host":"[::1]","port":80,"draining":true}"#))
        XCTAssertEqual(v6.host, "::1")
        XCTAssertEqual(v6.hostKind, .ipv6)
        XCTAssertTrue(v6.draining)
        XCTAssertEqual(try InstanceRecord.parse(bytes(#"{"host":"a","port":1,"listen":null}"#)).listen, nil)
    }

    func testBadJSONValuesSayWhy() {
        let cases: [(String, ValueError.Reason)] = [
            (#"{"port":80}"#, .missingField),
            (#"{"host":"h"}"#, .missingField),
            (#"{"host":"h","port":0}"#, .badPort),
            (#"{"host":"h","port":65536}"#, .badPort),
            (#"{"host":"h","port":-1}"#, .badPort),
            (#"{"host":"h","port":"80"}"#, .wrongType),
            (#"{"host":"h","port":80.5}"#, .wrongType),
            (#"{"host":"h","port":1e40}"#, .wrongType),
            (#"{"host":"h","port":123456789012345678901234567890}"#, .wrongType),
            (#"{"host":5,"port":80}"#, .wrongType),
            (#"{"host":"","port":80}"#, .badHost),
            (#"{"host":"a b","port":80}"#, .badHost),
            (#"{"host":"999.1.1.1","port":80}"#, .badHost),
            (#"{"host":"h","port":80,"listen":70000}"#, .badPort),
            (#"{"host":"h","port":80,"weight":999}"#, .outOfRange),
            (#"{"host":"h","port":80,"tags":"a"}"#, .wrongType),
            (#"{"host":"h","port":80,"tags":[1]}"#, .wrongType),
            (#"{"host":"h","port":80,"meta":{"a":1}}"#, .wrongType),
            (#"{"host":"h","port":80,"draining":"yes"}"#, .wrongType),
            (#"{"host":"h","port":80"#, .notJSON),
            (#"{"host":"h","port":80}}"#, .notJSON),
            ("", .empty),
            ("  \n", .empty),
        ]
        for (text, reason) in cases {
            XCTAssertThrowsError(try InstanceRecord.parse(bytes(text)), text) { error in
                XCTAssertEqual((error as? ValueError)?.reason, reason, "\(text): \(error)")
            }
        }
        XCTAssertThrowsError(try InstanceRecord.parse([0xFF, 0xFE, 0x3A, 0x31])) { error in
            XCTAssertEqual((error as? ValueError)?.reason, .notUTF8)
        }
        XCTAssertThrowsError(try InstanceRecord.parse(bytes("{" + String(repeating: " ", count: 70_000) + "}"))) { error in
            XCTAssertEqual((error as? ValueError)?.reason, .tooLarge)
        }
    }

    func testHostPortValues() throws {
        XCTAssertEqual(try InstanceRecord.parse(bytes("10.170.71.226:49153")), InstanceRecord(host: "10.170.71.226", port: 49153))
        XCTAssertEqual(try InstanceRecord.parse(bytes(" \t10.0.0.1:80\r\n")), InstanceRecord(host: "10.0.0.1", port: 80))
        XCTAssertEqual(try InstanceRecord.parse(bytes("[::1]:8080")), InstanceRecord(host: "::1", port: 8080))
        XCTAssertEqual(try InstanceRecord.parse(bytes("[2001:db8::5]:443")).hostKind, .ipv6)
        XCTAssertEqual(try InstanceRecord.parse(bytes("web-1.example.org:80")), InstanceRecord(host: "web-1.example.org", port: 80))
        XCTAssertEqual(try InstanceRecord.parse(bytes("localhost:80")).hostKind, .name)
        let bad: [(String, ValueError.Reason)] = [
            ("10.0.0.1", .badPort), ("10.0.0.1:", .badPort), ("10.0.0.1:0", .badPort), ("10.0.0.1:65536", .badPort),
            ("10.0.0.1:+80", .badPort), ("10.0.0.1:80x", .badPort), ("10.0.0.1:000000080", .badPort),
            (":80", .badHost), ("*:80", .badHost), ("::1:80", .badHost), ("[::1]80", .badPort), ("[::1:80", .badHost),
            ("[10.0.0.1]:80", .badHost), ("bad host:80", .badHost), ("-a.b:80", .badHost), ("256.0.0.1:80", .badHost),
        ]
        for (text, reason) in bad {
            XCTAssertThrowsError(try InstanceRecord.parse(bytes(text)), text) { error in
                XCTAssertEqual((error as? ValueError)?.reason, reason, "\(text): \(error)")
            }
        }
    }

    func testEncodersAreStableAndRoundTrip() throws {
        let record = InstanceRecord(host: "127.0.0.5", port: 32768, listen: 8000, proto: "tcp", weight: 1,
                                    tags: ["x\"y", "z"], meta: ["b": "2", "a": "1\n"], draining: true)
        let json = record.encodedJSON()
        XCTAssertEqual(json, #"{"host":"127.0.0.5","port":32768,"listen":8000,"proto":"tcp","weight":1,"tags":["x\"y","z"],"meta":{"a":"1\n","b":"2"},"draining":true}"#)
        XCTAssertEqual(try InstanceRecord.parse(bytes(json)), record)
        XCTAssertEqual(InstanceRecord(host: "h", port: 1).encodedJSON(), #"{"host":"h","port":1}"#)
        XCTAssertEqual(InstanceRecord(host: "::1", port: 80).encodedHostPort(), "[::1]:80")
        XCTAssertEqual(InstanceRecord(host: "10.0.0.1", port: 80).encodedHostPort(), "10.0.0.1:80")
        for host in ["::1", "10.0.0.1", "name.local"] {
            let plain = InstanceRecord(host: host, port: 9)
            XCTAssertEqual(try InstanceRecord.parse(bytes(plain.encodedHostPort())), plain)
            XCTAssertEqual(try InstanceRecord.parse(bytes(plain.encodedJSON())), plain)
        }
        XCTAssertEqual(JSONText.quote("\u{1}"), "\"\\u0001\"")
    }

    func testServiceConfig() throws {
        let config = try ServiceConfig.parse(bytes("""
            {"listen":8000,"check":{"kind":"http","path":"/health","interval":"2s","timeout":1000,"rise":2,"fall":3,
             "status":"200-299","host":"example.org"},"connect_timeout":"5s","client_timeout":"1m",
             "server_timeout":"90s","retries":2,"linger":"10s","unknown":true}
            """))
        XCTAssertEqual(config.listen, 8000)
        XCTAssertEqual(config.connectTimeout, 5_000)
        XCTAssertEqual(config.clientTimeout, 60_000)
        XCTAssertEqual(config.serverTimeout, 90_000)
        XCTAssertEqual(config.retries, 2)
        XCTAssertEqual(config.linger, 10_000)
        let settings = config.frontendSettings(over: FrontendSettings(retries: 3, connectTimeout: 1))
        XCTAssertEqual(settings, FrontendSettings(retries: 2, connectTimeout: 5_000, clientTimeout: 60_000, serverTimeout: 90_000))
        let check = try XCTUnwrap(config.check).settings(over: CheckSettings())
        XCTAssertEqual(check, CheckSettings(kind: .http(HTTPCheck(path: "/health", host: "example.org", expectedStatus: 200...299)),
                                           interval: 2_000, timeout: 1_000, rise: 2, fall: 3))
        // Only what is set changes; a path alone makes an http check.
        let pathOnly = try ServiceConfig.parse(bytes(#"{"check":{"path":"/up"}}"#))
        XCTAssertEqual(pathOnly.check?.settings(over: CheckSettings(interval: 500)),
                       CheckSettings(kind: .http(HTTPCheck(path: "/up")), interval: 500))
        let tls = try ServiceConfig.parse(bytes(#"{"check":{"kind":"tls","sni":"db"}}"#))
        XCTAssertEqual(tls.check?.settings(over: CheckSettings()).kind, .tls(TLSCheck(serverName: "db")))
        XCTAssertEqual(try ServiceConfig.parse(bytes("{}")), ServiceConfig())
        XCTAssertEqual(try ServiceConfig.parse(bytes(#"{"send_proxy":"v2"}"#)).frontendSettings(over: FrontendSettings()).sendProxy, .v2)
        var proxied = FrontendSettings()
        proxied.sendProxy = .v1
        XCTAssertNil(try ServiceConfig.parse(bytes(#"{"send_proxy":"none"}"#)).frontendSettings(over: proxied).sendProxy)
        XCTAssertEqual(try ServiceConfig.parse(bytes("{}")).frontendSettings(over: proxied).sendProxy, .v1)
        let logged = try ServiceConfig.parse(bytes(#"{"log_connections":true}"#))
        XCTAssertEqual(logged.logConnections, true)
        XCTAssertTrue(logged.frontendSettings(over: FrontendSettings()).logConnections)
        var loggingDefaults = FrontendSettings()
        loggingDefaults.logConnections = true
        XCTAssertFalse(try ServiceConfig.parse(bytes(#"{"log_connections":false}"#)).frontendSettings(over: loggingDefaults).logConnections,
                       "a service turns the command line's log off for itself")
        let balanced = try ServiceConfig.parse(bytes(#"{"balance":"source","slow_start":"30s"}"#)).frontendSettings(over: FrontendSettings())
        XCTAssertEqual(balanced.balance, .source)
        XCTAssertEqual(balanced.slowStart, 30_000)
        var rampingDefaults = FrontendSettings()
        rampingDefaults.slowStart = 5_000
        rampingDefaults.balance = .leastConn
        let off = try ServiceConfig.parse(bytes(#"{"slow_start":0}"#)).frontendSettings(over: rampingDefaults)
        XCTAssertEqual(off.slowStart, 0, "a service turns the command line's slow start off for itself")
        XCTAssertEqual(off.balance, .leastConn)
        let bad: [(String, ValueError.Reason)] = [
            (#"{"listen":0}"#, .badPort), (#"{"listen":"8000"}"#, .wrongType), (#"{"retries":-1}"#, .outOfRange),
            (#"{"connect_timeout":"5 parsecs"}"#, .badDuration), (#"{"linger":true}"#, .badDuration),
            (#"{"linger":-5}"#, .badDuration), (#"{"check":"http"}"#, .notObject),
            (#"{"connect_timeout":0}"#, .badDuration), (#"{"connect_timeout":"0s"}"#, .badDuration),
            (#"{"server_timeout":9223372036854775807}"#, .badDuration), (#"{"client_timeout":"30d"}"#, .badDuration),
            (#"{"check":{"kind":"icmp"}}"#, .badCheck), (#"{"check":{"kind":"tcp","path":"/x"}}"#, .badCheck),
            (#"{"check":{"path":"health"}}"#, .badCheck), (#"{"check":{"status":"600"}}"#, .badCheck),
            (#"{"check":{"interval":"1ms"}}"#, .badCheck), (#"{"check":{"rise":0}}"#, .outOfRange),
            (#"{"log_connections":"yes"}"#, .wrongType), (#"{"send_proxy":"v3"}"#, .wrongType), (#"{"send_proxy":2}"#, .wrongType),
            (#"{"balance":"random"}"#, .wrongType), (#"{"balance":1}"#, .wrongType), (#"{"slow_start":"soon"}"#, .badDuration),
            (#"{"slow_start":-1}"#, .badDuration),
            ("[]", .notObject), ("8000", .notObject), ("", .empty), ("{", .notJSON),
        ]
        for (text, reason) in bad {
            XCTAssertThrowsError(try ServiceConfig.parse(bytes(text)), text) { error in
                XCTAssertEqual((error as? ValueError)?.reason, reason, "\(text): \(error)")
            }
        }
    }

    func testJSONParserIsStrictAndBounded() throws {
        func parse(_ text: String) throws -> JSONValue { try JSONValue.parse(Array(text.utf8)) }
        XCTAssertEqual(try parse(#" {"a" : [1, -2, 3.5, 1e3, true, false, null, "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"], "a2": {}} "#),
                       .object(["a": .array([.integer(1), .integer(-2), .number(3.5), .number(1000), .bool(true), .bool(false), .null,
                                             .string("x\"\\/\u{8}\u{c}\n\r\té😀")]), "a2": .object([:])]))
        XCTAssertEqual(try parse("9223372036854775807"), .integer(Int64.max))
        XCTAssertEqual(try parse("9223372036854775808"), .number(9223372036854775808))
        XCTAssertEqual(try parse("-0"), .integer(0))
        XCTAssertEqual(try parse(#"{"a":1,"a":2}"#), .object(["a": .integer(2)]), "the last duplicate wins")
        XCTAssertEqual(try parse(String(repeating: "[", count: 32) + String(repeating: "]", count: 32)).typeName, "an array")
        let bad = ["", "{", "[1,]", "{\"a\":1,}", "01", "1.", ".5", "+1", "1e", "NaN", "Infinity", "tru", "nul", "[1] x",
                   "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"a\u{1}\"", "{'a':1}", "{a:1}", "\"abc",
                   String(repeating: "[", count: 33) + String(repeating: "]", count: 33), "[" + String(repeating: "{\"a\":", count: 40)]
        for text in bad {
            XCTAssertThrowsError(try parse(text), text) { error in
                XCTAssertEqual((error as? ValueError)?.reason, .notJSON, text)
            }
        }
        XCTAssertThrowsError(try JSONValue.parse([0x22, 0xC3, 0x28, 0x22])) { error in
            XCTAssertEqual((error as? ValueError)?.reason, .notJSON, "invalid UTF-8 in a string")
        }
    }

    func testHostKinds() {
        XCTAssertEqual(HostKind.classify("10.0.0.1"), .ipv4)
        XCTAssertEqual(HostKind.classify("::ffff:10.0.0.1"), .ipv6)
        XCTAssertEqual(HostKind.classify("fe80::1"), .ipv6)
        XCTAssertEqual(HostKind.classify("host.example.org."), .name)
        XCTAssertEqual(HostKind.classify("my_host"), .name)
        XCTAssertNil(HostKind.classify("a..b"))
        XCTAssertNil(HostKind.classify(String(repeating: "a", count: 64)))
        XCTAssertNil(HostKind.classify("1.2.3"))
        XCTAssertNil(HostKind.classify("::g"))
        XCTAssertNil(HostKind.classify("."))
    }
}
