// `--static-file`: the parser alone, then `berth register` / `berth run` processes on a real etcd
// reloading the file on SIGHUP (only the difference written, under the same lease; a bad file
// changes nothing), and an in-process registrar's reload counts.
@testable import BerthRegistrar
import BerthEtcd
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class StaticServiceFileTests: XCTestCase {
    private func parse(_ lines: [String], flags: [String] = []) throws(StaticServiceFileError) -> [Registration] {
        let registrations = flags.map { try! StaticService(parsing: $0).registration }
        return try StaticServiceFile.parse(lines.joined(separator: "\n"), path: "/etc/berth/statics", flags: registrations)
    }

    private func failure(_ lines: [String], flags: [String] = [], file: StaticString = #filePath, line: UInt = #line) -> StaticServiceFileError? {
        do {
            let entries = try parse(lines, flags: flags)
            XCTFail("accepted: \(entries)", file: file, line: line)
            return nil
        } catch {
            return error
        }
    }

    func testCommentsBlankLinesAndSpacesAreSkipped() throws {
        let entries = try parse([
            "# static services of this host",
            "",
            "   ",
            "  db=10.0.0.5:5432  ",
            "\t# an indented comment",
            "web=10.0.0.6:8080@80\r",
            "\tcache=10.0.0.7:6379\t",
        ])
        XCTAssertEqual(entries, [
            Registration(service: "db", instance: "10.0.0.5:5432", host: "10.0.0.5", port: 5432, listen: 5432, meta: ["static": "true"]),
            Registration(service: "web", instance: "10.0.0.6:8080", host: "10.0.0.6", port: 8080, listen: 80, meta: ["static": "true"]),
            Registration(service: "cache", instance: "10.0.0.7:6379", host: "10.0.0.7", port: 6379, listen: 6379, meta: ["static": "true"]),
        ])
        XCTAssertEqual(try parse(["# nothing but a comment", ""]), [])
        XCTAssertEqual(try parse([]), [])
    }

    func testCRLFLinesAreCountedOneByOne() throws {
        let text = "a=127.0.0.1:1\r\n\r\nb=127.0.0.1:2\r\nnope\r\n"
        XCTAssertThrowsError(try StaticServiceFile.parse(text, path: "f")) { error in
            XCTAssertEqual((error as? StaticServiceFileError)?.line, 4, "\(error)")
        }
        XCTAssertEqual(try StaticServiceFile.parse("a=127.0.0.1:1\r\nb=127.0.0.1:2\r\n", path: "f").map(\.service), ["a", "b"])
    }

    func testABadLineIsNamedWithItsNumberAndReason() throws {
        let error = try XCTUnwrap(failure(["# header", "db=10.0.0.5:5432", "", "db=10.0.0.5:99999"]))
        XCTAssertEqual(error.line, 4)
        XCTAssertEqual(error.path, "/etc/berth/statics")
        XCTAssertEqual(error.description,
                       "/etc/berth/statics: line 4: invalid static service 'db=10.0.0.5:99999': expected HOST:PORT with a port from 1 to 65535")
        XCTAssertEqual(failure(["garbage"])?.line, 1)
        XCTAssertEqual(failure(["a=127.0.0.1:1", "# fine", "  =127.0.0.1:2"])?.reason, "invalid static service '=127.0.0.1:2': empty service name")
        // A comment after an entry is not one: the line is refused, not half read.
        XCTAssertEqual(failure(["db=10.0.0.5:5432 # primary"])?.line, 1)
    }

    func testOneServiceALine() throws {
        let error = try XCTUnwrap(failure(["a=127.0.0.1:1", "b=127.0.0.1:2,c=127.0.0.1:3"]))
        XCTAssertEqual(error.line, 2)
        XCTAssertTrue(error.reason.contains("comma"), error.reason)
    }

    func testIPv6HostsInBrackets() throws {
        let entries = try parse(["v6=[::1]:8001@8000", " v6=[2001:db8::5]:8001 "])
        XCTAssertEqual(entries.map(\.host), ["::1", "2001:db8::5"])
        XCTAssertEqual(entries.map(\.instance), ["[::1]:8001", "[2001:db8::5]:8001"])
        XCTAssertEqual(entries.map(\.listen), [8000, 8001])
        let error = try XCTUnwrap(failure(["v4=127.0.0.1:1", "v6=::1:8001"]))
        XCTAssertEqual(error.line, 2)
        XCTAssertTrue(error.reason.contains("brackets"), error.reason)
    }

    func testDuplicatesNameBothPlaces() throws {
        // In the file: the same service and instance twice, whatever the listen port.
        let inFile = try XCTUnwrap(failure(["db=10.0.0.5:5432", "# again", "db=10.0.0.5:5432@6432"]))
        XCTAssertEqual(inFile.line, 3)
        XCTAssertEqual(inFile.reason, "service db instance 10.0.0.5:5432 is already registered by line 1")
        // Between the file and --static.
        let withFlag = try XCTUnwrap(failure(["web=10.0.0.6:80", "db=10.0.0.5:5432"], flags: ["db=10.0.0.5:5432@15432"]))
        XCTAssertEqual(withFlag.line, 2)
        XCTAssertEqual(withFlag.reason, "service db instance 10.0.0.5:5432 is already registered by --static db=10.0.0.5:5432")
        XCTAssertEqual(failure(["v6=[::1]:1"], flags: ["v6=[::1]:1"])?.reason, "service v6 instance [::1]:1 is already registered by --static v6=[::1]:1")
        // Another service on the same address, or the same service on another, is no duplicate.
        XCTAssertEqual(try parse(["db=10.0.0.5:5432", "db-replica=10.0.0.5:5432", "db=10.0.0.6:5432"], flags: ["db=10.0.0.7:5432"]).count, 3)
    }

    func testUnreadableMissingAndOversizedFiles() throws {
        let missing = "\(NSTemporaryDirectory())berth-no-such-static-file-\(getpid())"
        XCTAssertThrowsError(try StaticServiceFile.load(path: missing, flags: [])) { error in
            let error = error as? StaticServiceFileError
            XCTAssertNil(error?.line)
            XCTAssertEqual(error?.path, missing)
            XCTAssertTrue(error?.reason.contains("No such file") == true, "\(String(describing: error))")
        }
        XCTAssertThrowsError(try StaticServiceFile.load(path: NSTemporaryDirectory(), flags: [])) { error in
            XCTAssertTrue("\(error)".contains("cannot read it"), "\(error)")
        }
        let large = "\(NSTemporaryDirectory())berth-large-static-file-\(getpid())"
        defer { unlink(large) }
        let line = "service=127.0.0.1:1\n"
        try String(repeating: line, count: StaticServiceFile.sizeLimit / line.utf8.count + 1).write(toFile: large, atomically: false, encoding: .utf8)
        XCTAssertThrowsError(try StaticServiceFile.load(path: large, flags: [])) { error in
            XCTAssertEqual((error as? StaticServiceFileError)?.reason, "larger than 1 MiB")
        }
    }
}

/// `berth register` / `berth run` with `--static-file` on a real etcd.
final class StaticFileReloadTests: XCTestCase {
    /// One etcd for the class, started by the first test that asks for it.
    private static let etcd = Result { try EtcdFixture() }

    override class func tearDown() {
        (try? etcd.get())?.stop()
        super.tearDown()
    }

    private var processes: [SpawnedProcess] = []
    private var files: [String] = []

    override func tearDown() {
        for process in processes { process.stop(grace: 5) }
        processes = []
        for file in files { unlink(file) }
        files = []
    }

    private func fixture() throws -> (EtcdFixture, EtcdReader) {
        let etcd: EtcdFixture
        do {
            etcd = try Self.etcd.get()
        } catch {
            throw XCTSkip("no real etcd: \(error)")
        }
        return (etcd, try EtcdReader(etcd))
    }

    private func staticFile(_ name: String) -> String {
        let path = "\(NSTemporaryDirectory())berth-static-\(getpid())-\(name)"
        files.append(path)
        return path
    }

    private func write(_ lines: [String], to path: String) throws {
        try (lines.joined(separator: "\n") + "\n").write(toFile: path, atomically: true, encoding: .utf8)
    }

    private func spawn(_ arguments: [String]) throws -> SpawnedProcess {
        let process = try SpawnedProcess(BerthBinary.path, arguments)
        processes.append(process)
        return process
    }

    /// Every key under `prefix` as etcd holds it (value, lease, mod revision).
    private func snapshot(_ reader: EtcdReader, _ prefix: String) async throws -> [String: KeyValue] {
        var result: [String: KeyValue] = [:]
        for keyValue in try await reader.client.get(prefix: prefix + "/").keyValues { result[keyValue.key] = keyValue }
        return result
    }

    /// The keys and values Berth writes for static services (service, host, port, listen):
    /// `<prefix>/<service>/<host>:<port>` (an IPv6 host in brackets) and Berth's JSON.
    private func table(_ prefix: String, _ entries: [(String, String, Int, Int)]) -> [String: String] {
        var result: [String: String] = [:]
        for (service, host, port, listen) in entries {
            let instance = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            result["\(prefix)/\(service)/\(instance)"] = #"{"host":"\#(host)","port":\#(port),"listen":\#(listen),"weight":1,"meta":{"static":"true"}}"#
        }
        return result
    }

    private func waitForStandardError(_ process: SpawnedProcess, containing text: String, timeout: Double = 10) -> Bool {
        waitUntil(timeout: timeout) { process.standardError.contains(text) } != nil
    }

    /// SIGHUP with a file that must be refused: the error is logged, and two lease checks later
    /// (time for any write the reload might wrongly cause) etcd still holds `keeping`, to the
    /// modification revision, and the process runs on.
    private func assertRefusedReload(_ process: SpawnedProcess, _ reader: EtcdReader, _ prefix: String, logged: String,
                                     keeping: [String: KeyValue], file: StaticString = #filePath, line: UInt = #line) async throws {
        process.signal(SIGHUP)
        XCTAssertTrue(waitForStandardError(process, containing: logged), process.standardError, file: file, line: line)
        try await Task.sleep(for: .seconds(2))
        let now = try await snapshot(reader, prefix)
        XCTAssertEqual(now, keeping, "a refused reload changed etcd", file: file, line: line)
        XCTAssertTrue(process.isRunning, process.standardError, file: file, line: line)
    }

    /// SIGTERM: exit 0 and every key under `prefix` gone (the lease revoked).
    private func assertSigtermRevokes(_ process: SpawnedProcess, _ reader: EtcdReader, _ prefix: String,
                                      file: StaticString = #filePath, line: UInt = #line) async {
        process.signal(SIGTERM)
        XCTAssertTrue(process.waitForExit(timeout: 15), process.standardError, file: file, line: line)
        XCTAssertEqual(process.exitCode, 0, process.standardError, file: file, line: line)
        await assertEventually(timeout: 5, "SIGTERM left keys behind", file: file, line: line) { try await reader.get(prefix: prefix + "/").isEmpty }
    }

    func testRegisterReloadsTheFileOnSighupUnderTheSameLease() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-file-register"
        let path = staticFile("register")
        try write([
            "# static services of this host",
            "  a=127.0.0.1:7001@8001  ",
            "b=127.0.0.1:7002@8002",
            "",
            "c=[::1]:7003@8003",
        ], to: path)
        let process = try spawn(["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker", "--ttl", "5s",
                                 "--static-file", path, "--static", "d=127.0.0.1:7004"])
        let first = table(prefix, [("a", "127.0.0.1", 7001, 8001), ("b", "127.0.0.1", 7002, 8002), ("c", "::1", 7003, 8003),
                                   ("d", "127.0.0.1", 7004, 7004)])
        await assertEventually(timeout: 10, process.standardError) { try await reader.get(prefix: prefix + "/") == first }
        let before = try await snapshot(reader, prefix)
        let lease = try XCTUnwrap(before.values.first?.lease)
        XCTAssertNotEqual(lease, 0)
        XCTAssertEqual(Set(before.values.map(\.lease)), [lease], "one lease for the file's and the flag's keys")

        // b removed, c's LISTEN changed, e added, a untouched.
        try write([
            "a=127.0.0.1:7001@8001",
            "c=[::1]:7003@9003",
            "# e is new",
            "e=127.0.0.1:7005",
        ], to: path)
        process.signal(SIGHUP)
        let second = table(prefix, [("a", "127.0.0.1", 7001, 8001), ("c", "::1", 7003, 9003), ("d", "127.0.0.1", 7004, 7004),
                                    ("e", "127.0.0.1", 7005, 7005)])
        await assertEventually(timeout: 10, process.standardError) { try await reader.get(prefix: prefix + "/") == second }
        XCTAssertTrue(waitForStandardError(process, containing: "static services reloaded from \(path): 3 entries (+2, -1)"), process.standardError)
        let after = try await snapshot(reader, prefix)
        XCTAssertEqual(Set(after.values.map(\.lease)), [lease], "the reload kept the lease")
        // Unchanged keys were not put again: same modification revision.
        for key in ["\(prefix)/a/127.0.0.1:7001", "\(prefix)/d/127.0.0.1:7004"] {
            XCTAssertEqual(after[key]?.modRevision, before[key]?.modRevision, key)
        }
        XCTAssertGreaterThan(after["\(prefix)/c/[::1]:7003"]?.modRevision ?? 0, before["\(prefix)/c/[::1]:7003"]?.modRevision ?? .max)
        XCTAssertTrue(process.isRunning)

        // A garbage line: logged with its number, nothing in etcd changes, the process runs on.
        try write([
            "a=127.0.0.1:7001@8001",
            "c=[::1]:7003@9003",
            "this is not a service",
            "e=127.0.0.1:7005",
        ], to: path)
        try await assertRefusedReload(process, reader, prefix, logged: "static services not reloaded from \(path): line 3: invalid static service 'this is not a service'",
                                      keeping: after)
        XCTAssertEqual(process.standardError.components(separatedBy: "static services reloaded").count - 1, 1, process.standardError)

        // A missing file: the same.
        unlink(path)
        try await assertRefusedReload(process, reader, prefix, logged: "static services not reloaded from \(path): cannot read it", keeping: after)

        await assertSigtermRevokes(process, reader, prefix)
    }

    /// The periodic resync reads back this host's keys only, not the registry around them
    /// (every host of a fleet doing that every 30 s would cost etcd the registry's size × hosts),
    /// and still puts back a key deleted behind its back.
    func testTheResyncReadsBackOnlyThisHostsKeysAndRepairsThem() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-read-back"
        // 2,000 other hosts' instances, about 240 KB: what a read of the whole prefix would send.
        let filler = String(repeating: "x", count: 100)
        for batch in stride(from: 0, to: 2_000, by: 100) {
            try await reader.client.putAll((batch..<batch + 100).map { (key: "\(prefix)/other/10.0.0.1:\($0)", value: Array(filler.utf8)) })
        }
        let process = try spawn(["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker", "--ttl", "5s",
                                 "--resync", "1s", "--static", "mine=127.0.0.1:7101,mine=127.0.0.1:7102"])
        let key = "\(prefix)/mine/127.0.0.1:7101"
        await assertEventually(timeout: 10, process.standardError) { try await reader.get(prefix: "\(prefix)/mine/").count == 2 }

        let metrics = { () throws -> Double in
            let text = try HTTPProbe.get(port: etcd.members[0].clientPort, path: "/metrics")
            let line = try XCTUnwrap(text.split(separator: "\n").first { $0.hasPrefix("etcd_network_client_grpc_sent_bytes_total ") })
            return try XCTUnwrap(Double(line.split(separator: " ").last ?? ""))
        }
        let before = try metrics()
        let started = monotonicSeconds()
        try await Task.sleep(for: .seconds(4))
        let sent = try metrics() - before
        let seconds = monotonicSeconds() - started
        // Four resyncs or more; each whole-prefix read would have been about 240 KB.
        XCTAssertLessThan(sent, 60_000, "etcd sent \(Int(sent)) bytes in \(seconds) s to one registrar of 2 keys")

        _ = try await reader.client.delete(key: key)
        await assertEventually(timeout: 5, "the resync did not put the key back") { try await reader.get(prefix: "\(prefix)/mine/")[key] != nil }
        XCTAssertTrue(waitForStandardError(process, containing: "\(key) changed or missing in etcd: writing it again"), process.standardError)
        await assertSigtermRevokes(process, reader, prefix + "/mine")
        _ = try await reader.client.delete(prefix: prefix + "/")
    }

    func testSighupWithoutAStaticFileIsLoggedAndIgnored() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-file-none"
        let process = try spawn(["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker", "--ttl", "5s",
                                 "--static", "only=127.0.0.1:7100"])
        await assertEventually(timeout: 10, process.standardError) { try await reader.get(prefix: prefix + "/").count == 1 }
        let before = try await snapshot(reader, prefix)
        process.signal(SIGHUP)
        XCTAssertTrue(waitForStandardError(process, containing: "SIGHUP: no --static-file to reload"), process.standardError)
        XCTAssertTrue(process.isRunning, "SIGHUP ended the process: \(process.standardError)")
        let after = try await snapshot(reader, prefix)
        XCTAssertEqual(after, before)
        await assertSigtermRevokes(process, reader, prefix)
    }

    /// `berth run` takes the flag too; with no Docker socket, `--static-file` alone means static
    /// services only, as `--static` does.
    func testRunReloadsTheFileOnSighup() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-file-run"
        let path = staticFile("run")
        let listen = try freeLoopbackPort()
        let dockerAbsent = access("/var/run/docker.sock", F_OK) != 0
        try write(["web=127.0.0.1:7201@\(listen)"], to: path)
        let process = try spawn(["run", "--etcd", etcd.endpoints, "--prefix", prefix, "--static-file", path,
                                 "--bind", "127.0.0.1", "--workers", "1", "--stats", "off", "--ttl", "5s"] + (dockerAbsent ? [] : ["--no-docker"]))
        await assertEventually(timeout: 15, process.standardError) { try await reader.get(prefix: prefix + "/").keys.sorted() == ["\(prefix)/web/127.0.0.1:7201"] }
        if dockerAbsent {
            XCTAssertTrue(process.standardError.contains("registering this host's static services"), process.standardError)
        }
        let lease = try await reader.lease(of: "\(prefix)/web/127.0.0.1:7201")
        XCTAssertNotEqual(lease, 0)
        try write(["web=127.0.0.1:7202@\(listen)"], to: path)
        process.signal(SIGHUP)
        await assertEventually(timeout: 10, process.standardError) { try await reader.get(prefix: prefix + "/").keys.sorted() == ["\(prefix)/web/127.0.0.1:7202"] }
        let leaseAfter = try await reader.lease(of: "\(prefix)/web/127.0.0.1:7202")
        XCTAssertEqual(leaseAfter, lease)
        XCTAssertTrue(waitForStandardError(process, containing: "static services reloaded from \(path): 1 entries (+1, -1)"), process.standardError)
        XCTAssertTrue(process.isRunning, process.standardError)
        await assertSigtermRevokes(process, reader, prefix)
    }

    func testABadFileAtStartExitsWithTheLineAndWritesNothing() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-file-bad"
        let path = staticFile("bad")
        let base = ["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker", "--static-file", path]
        try write(["# two good, one bad", "a=127.0.0.1:7301", "b=127.0.0.1:notaport"], to: path)
        let bad = try SpawnedProcess.run(BerthBinary.path, base, timeout: 10)
        XCTAssertEqual(bad.code, 64, bad.error)
        XCTAssertTrue(bad.error.contains("\(path): line 3: invalid static service 'b=127.0.0.1:notaport'"), bad.error)
        XCTAssertEqual(bad.error.split(separator: "\n").count, 1, bad.error)

        try write(["a=127.0.0.1:7301", "b=127.0.0.1:7302"], to: path)
        let duplicate = try SpawnedProcess.run(BerthBinary.path, base + ["--static", "b=127.0.0.1:7302@9"], timeout: 10)
        XCTAssertEqual(duplicate.code, 64, duplicate.error)
        XCTAssertTrue(duplicate.error.contains("line 2: service b instance 127.0.0.1:7302 is already registered by --static b=127.0.0.1:7302"),
                      duplicate.error)

        let twice = try SpawnedProcess.run(BerthBinary.path, ["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker",
                                                              "--static", "x=127.0.0.1:7303", "--static", "x=127.0.0.1:7303@80"], timeout: 10)
        XCTAssertEqual(twice.code, 64, twice.error)
        XCTAssertTrue(twice.error.contains("is given twice"), twice.error)

        unlink(path)
        let missing = try SpawnedProcess.run(BerthBinary.path, base, environment: [:], timeout: 10)
        XCTAssertEqual(missing.code, 64, missing.error)
        XCTAssertTrue(missing.error.contains("invalid --static-file \(path): cannot read it"), missing.error)

        // Through the environment too.
        try write(["nope"], to: path)
        let fromEnvironment = try SpawnedProcess.run(BerthBinary.path, ["register", "--etcd", etcd.endpoints, "--prefix", prefix, "--no-docker"],
                                                     environment: ["BERTH_STATIC_FILE": path], timeout: 10)
        XCTAssertEqual(fromEnvironment.code, 64, fromEnvironment.error)
        XCTAssertTrue(fromEnvironment.error.contains("\(path): line 1:"), fromEnvironment.error)

        let written = try await reader.get(prefix: prefix + "/")
        XCTAssertEqual(written, [:], "a refused start wrote to etcd")
    }

    /// The registrar in process, on the real etcd: reloads and refused reloads are counted in its
    /// status, and a refused one leaves the registered entries as they were.
    func testReloadsAreCountedInTheStatus() async throws {
        let (etcd, reader) = try fixture()
        let prefix = "/static-file-status"
        let path = staticFile("status")
        try write(["a=127.0.0.1:7401"], to: path)
        var configuration = RegistrarConfiguration(layout: RecordLayout(prefix: prefix), ttlSeconds: 5)
        configuration.staticFile = path
        configuration.fileStatics = try StaticServiceFile.load(path: path, flags: [])
        let registrar = Registrar(configuration: configuration, store: try EtcdRegistrationStore(endpoints: [etcd.endpoints]))
        let task = Task { try await registrar.run() }
        await assertEventually(timeout: 5) { try await reader.get(prefix: prefix + "/").keys.sorted() == ["\(prefix)/a/127.0.0.1:7401"] }
        XCTAssertEqual(registrar.status.staticReloads, 0)

        try write(["a=127.0.0.1:7401", "b=127.0.0.1:7402"], to: path)
        registrar.reloadStaticFile()
        await assertEventually(timeout: 5) { registrar.status.staticReloads == 1 }
        let keys = try await reader.get(prefix: prefix + "/").keys.sorted()
        XCTAssertEqual(keys, ["\(prefix)/a/127.0.0.1:7401", "\(prefix)/b/127.0.0.1:7402"])
        XCTAssertEqual(registrar.status.registered, 2)
        XCTAssertEqual(registrar.status.staticReloadsFailed, 0)

        try write(["a=127.0.0.1:7401", "b=127.0.0.1:7402", "b=127.0.0.1:7402"], to: path)
        registrar.reloadStaticFile()
        XCTAssertEqual(registrar.status.staticReloadsFailed, 1)
        XCTAssertEqual(registrar.status.staticReloads, 1)
        XCTAssertEqual(registrar.status.registered, 2)
        let kept = try await reader.get(prefix: prefix + "/").keys.sorted()
        XCTAssertEqual(kept, ["\(prefix)/a/127.0.0.1:7401", "\(prefix)/b/127.0.0.1:7402"])
        registrar.shutdown()
        try await task.value
        XCTAssertEqual(registrar.status.registered, 0)
        let left = try await reader.get(prefix: prefix + "/")
        XCTAssertEqual(left, [:])
    }
}
