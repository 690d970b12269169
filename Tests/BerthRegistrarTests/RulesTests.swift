// Pure rules: naming, key layout and values, the event-line parser, the write diff.
@testable import BerthRegistrar
import Foundation
import XCTest

final class NamingTests: XCTestCase {
    private let id = "4232a5d968c65b66fb27f3d802270b381b00694297ce8c4d2a32e450fa4caa9b"

    private func container(image: String = "jwilder/whoami:latest", labels: [String: String] = [:], environment: [String: String] = [:],
                           ports: [PublishedPort] = [PublishedPort(privatePort: 8000, hostIP: "127.0.0.1", publicPort: 32768)]) -> ContainerInfo {
        ContainerInfo(id: id, name: "w1", image: image, labels: labels, environment: environment, ports: ports)
    }

    func testImageNameWithoutRegistryNamespaceTagOrDigest() {
        XCTAssertEqual(RegistrationRules.imageName("jwilder/whoami:latest"), "whoami")
        XCTAssertEqual(RegistrationRules.imageName("whoami"), "whoami")
        XCTAssertEqual(RegistrationRules.imageName("registry.local:5000/team/app:1.2"), "app")
        XCTAssertEqual(RegistrationRules.imageName("app@sha256:abcd"), "app")
        XCTAssertEqual(RegistrationRules.imageName(""), "container")
    }

    func testOnePortUsesImageNameShortIDAndBindingAddress() {
        let (registrations, warnings) = RegistrationRules.registrations(for: container(), hostIP: "192.0.2.2")
        XCTAssertEqual(warnings, [])
        XCTAssertEqual(registrations, [Registration(service: "whoami", instance: "4232a5d968c6", host: "127.0.0.1", port: 32768, listen: 8000,
                                                    meta: ["container": "w1", "image": "jwilder/whoami:latest"])])
    }

    func testWildcardBindingUsesHostIPAndIsSkippedWithoutIt() {
        let ports = [PublishedPort(privatePort: 8000, hostIP: "0.0.0.0", publicPort: 8000), PublishedPort(privatePort: 8000, hostIP: "::", publicPort: 8000)]
        let (registrations, _) = RegistrationRules.registrations(for: container(ports: ports), hostIP: "192.0.2.2")
        XCTAssertEqual(registrations.map(\.host), ["192.0.2.2"])
        XCTAssertEqual(registrations.map(\.port), [8000])
        let (none, warnings) = RegistrationRules.registrations(for: container(ports: ports), hostIP: nil)
        XCTAssertEqual(none, [])
        XCTAssertEqual(warnings.count, 1)
    }

    func testSeveralPortsGetPortSuffixesUnlessNamedPerPort() {
        let ports = [PublishedPort(privatePort: 8001, hostIP: "127.0.0.1", publicPort: 40001),
                     PublishedPort(privatePort: 8000, hostIP: "127.0.0.1", publicPort: 40000),
                     PublishedPort(privatePort: 53, proto: "udp", hostIP: "127.0.0.1", publicPort: 40053)]
        let (plain, _) = RegistrationRules.registrations(for: container(ports: ports), hostIP: nil)
        XCTAssertEqual(plain.map(\.service), ["whoami-8000", "whoami-8001"])
        XCTAssertEqual(plain.map(\.instance), ["4232a5d968c6-8000", "4232a5d968c6-8001"])
        XCTAssertEqual(plain.map(\.listen), [8000, 8001])
        let (named, _) = RegistrationRules.registrations(
            for: container(labels: ["berth.service": "api", "berth.service.8001": "admin"], ports: ports), hostIP: nil)
        XCTAssertEqual(named.map(\.service), ["api-8000", "admin"])
        let (registrator, _) = RegistrationRules.registrations(
            for: container(environment: ["SERVICE_NAME": "web", "SERVICE_8000_NAME": "front"], ports: ports), hostIP: nil)
        XCTAssertEqual(registrator.map(\.service), ["front", "web-8001"])
    }

    func testLabelsWinOverRegistratorEnvironment() {
        let (registrations, _) = RegistrationRules.registrations(
            for: container(labels: ["berth.service": "label"], environment: ["SERVICE_NAME": "env"]), hostIP: nil)
        XCTAssertEqual(registrations.map(\.service), ["label"])
        let (environment, _) = RegistrationRules.registrations(for: container(environment: ["SERVICE_NAME": "env"]), hostIP: nil)
        XCTAssertEqual(environment.map(\.service), ["env"])
    }

    func testOptOutAndNoPortsAndStoppedRegisterNothing() {
        XCTAssertEqual(RegistrationRules.registrations(for: container(labels: ["berth.ignore": "true"]), hostIP: nil).registrations, [])
        XCTAssertEqual(RegistrationRules.registrations(for: container(environment: ["SERVICE_IGNORE": "1"]), hostIP: nil).registrations, [])
        XCTAssertEqual(RegistrationRules.registrations(for: container(environment: ["SERVICE_8000_IGNORE": "yes"]), hostIP: nil).registrations, [])
        XCTAssertEqual(RegistrationRules.registrations(for: container(ports: []), hostIP: "192.0.2.2").registrations, [])
        var stopped = container()
        stopped.running = false
        XCTAssertEqual(RegistrationRules.registrations(for: stopped, hostIP: nil).registrations, [])
        XCTAssertEqual(RegistrationRules.registrations(for: container(labels: ["berth.ignore": "false"]), hostIP: nil).registrations.count, 1)
    }

    func testPausedOrUnhealthyIsDrainingAndTagsWeight() {
        var paused = container(labels: ["berth.tags": "a, b,", "berth.weight": "5"])
        paused.paused = true
        let (registrations, _) = RegistrationRules.registrations(for: paused, hostIP: nil)
        XCTAssertEqual(registrations.first?.draining, true)
        XCTAssertEqual(registrations.first?.tags, ["a", "b"])
        XCTAssertEqual(registrations.first?.weight, 5)
        var unhealthy = container()
        unhealthy.health = "unhealthy"
        XCTAssertEqual(RegistrationRules.registrations(for: unhealthy, hostIP: nil).registrations.first?.draining, true)
        unhealthy.health = "healthy"
        XCTAssertEqual(RegistrationRules.registrations(for: unhealthy, hostIP: nil).registrations.first?.draining, false)
    }

    func testStaticServices() throws {
        let plain = try StaticService(parsing: "whoami=127.0.0.5:8001").registration
        XCTAssertEqual([plain.service, plain.instance, plain.host], ["whoami", "127.0.0.5:8001", "127.0.0.5"])
        XCTAssertEqual([plain.port, plain.listen], [8001, 8001])
        let listen = try StaticService(parsing: "jwilder/whoami=[::1]:8001@8000").registration
        XCTAssertEqual([listen.host, listen.instance], ["::1", "[::1]:8001"])
        XCTAssertEqual(listen.listen, 8000)
        for bad in ["whoami", "=1.2.3.4:5", "a=1.2.3.4", "a=1.2.3.4:0", "a=1.2.3.4:70000", "a=::1:80", "a=1.2.3.4:80@x", "a=:80"] {
            XCTAssertThrowsError(try StaticService(parsing: bad), bad)
        }
    }

    func testInspectDecoding() throws {
        let json = #"""
        {"Id":"\#(id)","Name":"/w1","Config":{"Image":"jwilder/whoami:latest","Labels":{"a":"b"},"Env":["SERVICE_NAME=x","BARE"]},
         "State":{"Running":true,"Paused":false,"Health":{"Status":"healthy"}},
         "NetworkSettings":{"Ports":{"8001/tcp":[{"HostIp":"127.0.0.1","HostPort":"40001"}],"8000/tcp":[{"HostIp":"0.0.0.0","HostPort":"40000"},{"HostIp":"::","HostPort":"40000"}],"9000/tcp":null}}}
        """#
        let info = try DockerJSON.container(from: Data(json.utf8))
        XCTAssertEqual(info.name, "w1")
        XCTAssertEqual(info.environment, ["SERVICE_NAME": "x", "BARE": ""])
        XCTAssertEqual(info.health, "healthy")
        XCTAssertEqual(info.ports.map(\.privatePort), [8000, 8000, 8001])
        XCTAssertThrowsError(try DockerJSON.container(from: Data("[1,2]".utf8)))
    }
}

final class RecordTests: XCTestCase {
    func testKeysEscapeSlashPercentAndLeadingUnderscore() {
        let layout = RecordLayout(prefix: "/backends/")
        XCTAssertEqual(layout.instanceKey(service: "jwilder/whoami", instance: "abc"), "/backends/jwilder%2Fwhoami/abc")
        XCTAssertEqual(layout.instanceKey(service: "100%", instance: "_x"), "/backends/100%25/%5Fx")
        XCTAssertEqual(layout.portKey(service: "whoami"), "/backends/whoami/port")
    }

    func testJSONValueIsStableAndEscaped() {
        let registration = Registration(service: "s", instance: "i", host: "127.0.0.1", port: 32768, listen: 8000,
                                        tags: ["a\"b"], meta: ["z": "1", "a": "\n"], draining: true)
        XCTAssertEqual(encodeRecord(registration),
                       #"{"host":"127.0.0.1","port":32768,"listen":8000,"weight":1,"tags":["a\"b"],"meta":{"a":"\n","z":"1"},"draining":true}"#)
        let decoded = try? JSONSerialization.jsonObject(with: Data(encodeRecord(registration).utf8)) as? [String: Any]
        XCTAssertEqual(decoded?["port"] as? Int, 32768)
    }

    func testSeedCompatWritesHostPortAndPortKeyAndLeavesDrainingOut() {
        let layout = RecordLayout(prefix: "/backends", compat: .seed)
        let table = layout.table([
            Registration(service: "whoami", instance: "a", host: "10.0.0.1", port: 32768, listen: 8000),
            Registration(service: "whoami", instance: "b", host: "::1", port: 32769, listen: 8000),
            Registration(service: "whoami", instance: "c", host: "10.0.0.1", port: 32770, listen: 8000, draining: true),
        ])
        XCTAssertEqual(table, ["/backends/whoami/a": "10.0.0.1:32768", "/backends/whoami/b": "[::1]:32769", "/backends/whoami/port": "8000"])
    }

    func testDiffPutsChangedAndDeletesUnwanted() {
        let diff = RecordDiff(desired: ["a": "1", "b": "2", "c": "3"], written: ["a": "1", "b": "old", "d": "4"])
        XCTAssertEqual(diff.puts.map(\.key), ["b", "c"])
        XCTAssertEqual(diff.deletes, ["d"])
        XCTAssertTrue(RecordDiff(desired: ["a": "1"], written: ["a": "1"]).isEmpty)
    }
}

final class EventParsingTests: XCTestCase {
    private let id = "4232a5d968c65b66fb27f3d802270b381b00694297ce8c4d2a32e450fa4caa9b"

    private func parse(_ text: String) -> EventLine { DockerEventParser.parse(Array(text.utf8)) }

    func testContainerEvents() {
        XCTAssertEqual(parse(#"{"status":"kill","id":"\#(id)","Type":"container","Action":"kill","Actor":{"ID":"\#(id)","Attributes":{"signal":"15"}}}"#),
                       .event(DockerEvent(containerID: id, action: .kill(signal: 15))))
        XCTAssertEqual(parse(#"{"Type":"container","Action":"health_status: unhealthy","Actor":{"ID":"\#(id)"}}"#),
                       .event(DockerEvent(containerID: id, action: .healthStatus("unhealthy"))))
        XCTAssertEqual(parse(#"{"status":"die","id":"\#(id)"}"#), .event(DockerEvent(containerID: id, action: .die)))
        XCTAssertEqual(parse(#"{"Type":"container","Action":"kill","Actor":{"ID":"\#(id)","Attributes":{"signal":"SIGHUP"}}}"#),
                       .event(DockerEvent(containerID: id, action: .kill(signal: 1))))
        XCTAssertFalse(DockerEventParser.isTerminating(signal: 1))
        XCTAssertTrue(DockerEventParser.isTerminating(signal: 15))
    }

    func testUnknownAndGarbageAreClassifiedNotThrown() {
        XCTAssertEqual(parse(#"{"Type":"network","Action":"connect","Actor":{"ID":"\#(id)"}}"#), .unknown("event type 'network'"))
        XCTAssertEqual(parse(#"{"Type":"container","Action":"exec_start: sh","Actor":{"ID":"\#(id)"}}"#), .unknown("action 'exec_start: sh'"))
        for garbage in ["not json", "{", "[]", "null", #"{"Type":"container","Action":"start"}"#, #"{"Type":"container","Action":"start","Actor":{"ID":"../../x"}}"#, "\u{0}\u{1}"] {
            guard case .garbage = parse(garbage) else { return XCTFail("\(garbage) → \(parse(garbage))") }
        }
    }

    func testLineSplitterAcrossChunksWithBound() {
        var splitter = LineSplitter(maximumLength: 8)
        XCTAssertEqual(splitter.append(Array("ab".utf8)), [])
        XCTAssertEqual(splitter.append(Array("c\r\n\nde".utf8)), [.line(Array("abc".utf8))])
        XCTAssertEqual(splitter.append(Array("fghijklmnop".utf8)), [.overlong])
        XCTAssertEqual(splitter.append(Array("qrs\nxy\n".utf8)), [.line(Array("xy".utf8))])
        // Exactly the bound, split across chunks, is a line; one byte more is overlong.
        XCTAssertEqual(splitter.append(Array("1234".utf8)), [])
        XCTAssertEqual(splitter.append(Array("5678\n1234".utf8)), [.line(Array("12345678".utf8))])
        XCTAssertEqual(splitter.append(Array("56789\nok\n".utf8)), [.overlong, .line(Array("ok".utf8))])
    }
}
