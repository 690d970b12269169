import BerthEngine
import BerthHealth
import BerthSystem
@testable import BerthDiscovery
import Glibc
import BerthTestSupport
import XCTest

/// The state file's codec (pure) and its atomic replacement and writer (a temporary directory).
final class StateFileTests: XCTestCase {
    private func address(_ text: String) -> SocketAddress { try! SocketAddress(parsing: text) }

    /// Two services, every setting off its default, odd names, IPv6, health and overrides.
    private func sample() -> SavedState {
        var settings = FrontendSettings(retries: 5, connectTimeout: 1_500, clientTimeout: 0, serverTimeout: 90_000,
                                        retryOnEmptyResponse: true, retryOnResponseTimeout: true, firstByteTimeout: 700)
        settings.replayLimit = 4096
        settings.balance = .leastConn
        settings.sendProxy = .v2
        settings.logConnections = true
        settings.slowStart = 30_000
        let table = RoutingTable(revision: 4242, frontends: [
            Frontend(name: "jwilder/whoami web", listen: address("0.0.0.0:8000"), backends: [
                Backend(name: "c1", address: address("127.0.0.5:32768"), weight: 3),
                Backend(name: "c%2 ü", address: address("[::1]:9000"), enabled: false, weight: 0),
            ], settings: settings),
            Frontend(name: "db", listen: address("[::]:5432"), backends: []),
        ])
        var state = SavedState(table: table,
                               health: [BackendKey(frontend: "jwilder/whoami web", backend: "c1"): .down],
                               adminStates: [BackendKey(frontend: "jwilder/whoami web", backend: "c%2 ü"): .maint],
                               savedAt: 1_764_930_000)
        state.weights = [BackendKey(frontend: "jwilder/whoami web", backend: "c1"): 0]
        return state
    }

    private func small() -> [UInt8] {
        StateFile.encode(SavedState(table: RoutingTable(revision: 7, frontends: [
            Frontend(name: "web", listen: address("0.0.0.0:80"), backends: [Backend(name: "a", address: address("127.0.0.1:81"))]),
        ]), savedAt: 1))
    }

    private func assertRejected(_ bytes: [UInt8], _ message: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try StateFile.decode(bytes), message, file: file, line: line)
    }

    func testRoundTrip() throws {
        let state = sample()
        XCTAssertEqual(try StateFile.decode(StateFile.encode(state)), state)
        let empty = SavedState(table: RoutingTable(revision: 0, frontends: []), savedAt: 0)
        XCTAssertEqual(try StateFile.decode(StateFile.encode(empty)), empty)
        XCTAssertTrue(String(decoding: StateFile.encode(state), as: UTF8.self).hasPrefix("berth-state 2 "))
    }

    func testEveryTruncationIsRejected() {
        let bytes = small()
        for length in 0..<bytes.count {
            assertRejected(Array(bytes[..<length]), "truncated to \(length) of \(bytes.count) bytes")
        }
        assertRejected(bytes + Array("backend b 127.0.0.1:82 weight=1 enabled=1 health=none admin=ready\n".utf8), "appended")
    }

    func testEveryFlippedByteIsRejected() {
        let bytes = small()
        for index in bytes.indices {
            var damaged = bytes
            damaged[index] ^= 0x20
            // A flip in the header's hex digits may only change their case, which is the same number.
            if let changed = try? StateFile.decode(damaged) {
                XCTAssertEqual(changed, try? StateFile.decode(bytes), "byte \(index) flipped gave another state")
            }
        }
        var body = bytes
        body[body.count - 3] = UInt8(ascii: "9")
        XCTAssertThrowsError(try StateFile.decode(body)) { XCTAssertEqual($0 as? StateFileError, .checksumMismatch) }
    }

    func testWrongVersionIsRejected() {
        for version in ["3", "0", "10", "x"] {
            let text = String(decoding: small(), as: UTF8.self).replacing("berth-state 2 ", with: "berth-state \(version) ")
            XCTAssertThrowsError(try StateFile.decode(Array(text.utf8))) {
                XCTAssertEqual($0 as? StateFileError, .unsupportedVersion(version))
            }
        }
    }

    /// A file written by the version before slow start and operator weights is still served.
    func testVersionOneIsRead() throws {
        let body = "revision 9\nsaved 5\nfrontend web 0.0.0.0:80 retries=3 connect=5000 client=60000 server=60000 retry-empty=0 "
            + "retry-timeout=0 first-byte=2000 replay=16384 balance=source proxy=none log=0\n"
            + "backend a 127.0.0.1:81 weight=4 enabled=1 health=up admin=drain\n"
        let bytes = Array(body.utf8)
        let header = "berth-state 1 \(bytes.count) \(StateFile.hex(CRC32.checksum(bytes)))\n"
        let state = try StateFile.decode(Array(header.utf8) + bytes)
        XCTAssertEqual(state.table.revision, 9)
        XCTAssertEqual(state.table.frontends.first?.settings.balance, .source)
        XCTAssertEqual(state.table.frontends.first?.settings.slowStart, 0)
        XCTAssertEqual(state.table.frontends.first?.backends.first?.weight, 4)
        XCTAssertEqual(state.adminStates[BackendKey(frontend: "web", backend: "a")], .drain)
        XCTAssertEqual(state.weights, [:])
        // A version-2 line in a version-1 file is refused.
        let v2 = body.replacing("admin=drain", with: "admin=drain set-weight=3")
        let v2Bytes = Array(v2.utf8)
        assertRejected(Array("berth-state 1 \(v2Bytes.count) \(StateFile.hex(CRC32.checksum(v2Bytes)))\n".utf8) + v2Bytes, "v2 line in v1")
    }

    func testGarbageIsRejected() {
        var generator = SystemRandomNumberGenerator()
        for size in [0, 1, 10, 63, 64, 100, 5000] {
            assertRejected((0..<size).map { _ in UInt8.random(in: 0...255, using: &generator) }, "\(size) random bytes")
        }
        assertRejected(Array("{\"revision\": 1}\n".utf8), "JSON")
        assertRejected(Array(repeating: UInt8(ascii: "\n"), count: 100), "newlines")
    }

    /// Bodies with a correct length and checksum whose values are wrong: each is refused.
    func testInvalidValuesAreRejected() {
        let settings = "retries=3 connect=5000 client=60000 server=60000 retry-empty=0 retry-timeout=0 first-byte=2000 replay=16384 balance=roundrobin proxy=none log=0"
        let backend = "weight=1 enabled=1 health=none admin=ready"
        let bodies = [
            "revision 1\n", // no saved line
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:0 \(settings)\n",
            "revision 1\nsaved 1\nfrontend web 300.0.0.1:80 \(settings)\n",
            "revision 1\nsaved 1\nfrontend web host.example:80 \(settings)\n",
            "revision 1\nsaved 1\nfrontend % 0.0.0.0:80 \(settings)\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings.replacing("retries=3", with: "retries=-1"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings.replacing("roundrobin", with: "random"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings.replacing("connect=5000", with: "connect=99999999999"))\n",
            "revision 1\nsaved 1\nbackend a 127.0.0.1:81 \(backend)\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\nbackend a 127.0.0.1:81 \(backend.replacing("weight=1", with: "weight=257"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\nbackend a 127.0.0.1:81 \(backend.replacing("admin=ready", with: "admin=gone"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\nbackend a 127.0.0.1:81 \(backend)\nbackend a 127.0.0.1:82 \(backend)\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\nfrontend web 0.0.0.0:81 \(settings)\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\nbackend a%0A 127.0.0.1:81 \(backend)\n",
            "revision 1\nsaved 1\nsaved 2\n",
            "revision 1\nsaved 1",
        ]
        for body in bodies {
            let bytes = Array(body.utf8)
            let header = "berth-state 1 \(bytes.count) \(StateFile.hex(CRC32.checksum(bytes)))\n"
            assertRejected(Array(header.utf8) + bytes, body)
        }
        let settings2 = settings + " slow-start=0"
        let backend2 = backend + " set-weight=none"
        let bodies2 = [
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings)\n", // a version-1 line
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings2.replacing("slow-start=0", with: "slow-start=-5"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings2)\nbackend a 127.0.0.1:81 \(backend2.replacing("set-weight=none", with: "set-weight=257"))\n",
            "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings2)\nbackend a 127.0.0.1:81 \(backend2.replacing("set-weight=none", with: "set-weight=x"))\n",
        ]
        for body in bodies2 {
            let bytes = Array(body.utf8)
            let header = "berth-state 2 \(bytes.count) \(StateFile.hex(CRC32.checksum(bytes)))\n"
            assertRejected(Array(header.utf8) + bytes, body)
        }
        let good = "revision 1\nsaved 1\nfrontend web 0.0.0.0:80 \(settings2)\nbackend a 127.0.0.1:81 \(backend2.replacing("set-weight=none", with: "set-weight=7"))\n"
        let goodBytes = Array(good.utf8)
        let decoded = try? StateFile.decode(Array("berth-state 2 \(goodBytes.count) \(StateFile.hex(CRC32.checksum(goodBytes)))\n".utf8) + goodBytes)
        XCTAssertEqual(decoded?.weights, [BackendKey(frontend: "web", backend: "a"): 7])
    }

    func testCRC32() {
        XCTAssertEqual(CRC32.checksum(Array("123456789".utf8)), 0xCBF4_3926)
        XCTAssertEqual(CRC32.checksum([UInt8]()), 0)
    }

    func testReplaceIsAtomicAndReadable() throws {
        let directory = try temporaryDirectory()
        defer { removeDirectory(directory) }
        let path = directory + "/state"
        XCTAssertNil(try StateFileStorage.read(path))
        try StateFileStorage.replace(path, with: StateFile.encode(sample()))
        try StateFileStorage.replace(path, with: small())
        XCTAssertEqual(try StateFileStorage.read(path), small())
        XCTAssertEqual(try FileManagerless.entries(directory), ["state"])
        XCTAssertThrowsError(try StateFileStorage.replace(directory + "/missing/state", with: small()))
    }

    /// A burst of states gives at most two writes (the first at once, the last a second later),
    /// and the file ends with the burst's last state; a write that fails is counted.
    func testWriterCoalescesAndCountsFailures() throws {
        let directory = try temporaryDirectory()
        defer { removeDirectory(directory) }
        let path = directory + "/state"
        let writer = StateFileWriter(path: path)
        var state = sample()
        for revision in 1...50 {
            state.table.revision = UInt64(revision)
            writer.submit(state)
        }
        try waitUntil("the last state is written") { (try? StateFileStorage.read(path)).flatMap { $0 }.flatMap { try? StateFile.decode($0) }?.table.revision == 50 }
        XCTAssertLessThanOrEqual(writer.writes, 2)
        writer.submit(state) // unchanged: no write
        writer.stop()
        XCTAssertLessThanOrEqual(writer.writes, 2)
        XCTAssertEqual(writer.failures, 0)

        let failing = StateFileWriter(path: directory + "/missing/state")
        failing.submit(state)
        try waitUntil("a failure is counted") { failing.failures >= 1 }
        failing.stop()
        XCTAssertEqual(failing.writes, 0)
    }

    private func waitUntil(_ what: String, timeout: Double = 10, _ condition: () -> Bool) throws {
        let deadline = MonotonicClock.milliseconds() + Int64(timeout * 1000)
        while !condition() {
            if MonotonicClock.milliseconds() > deadline { throw FixtureFailure("timed out waiting until \(what)") }
            usleep(10_000)
        }
    }

    private func temporaryDirectory() throws -> String {
        var template = Array("/tmp/berth-state-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw SystemError(call: "mkdtemp", errno: errno) }
        return String(cString: made)
    }

    private func removeDirectory(_ path: String) {
        for name in (try? FileManagerless.entries(path)) ?? [] { unlink(path + "/" + name) }
        rmdir(path)
    }
}

/// Directory listing without Foundation.
enum FileManagerless {
    static func entries(_ path: String) throws -> [String] {
        guard let directory = opendir(path) else { throw SystemError(call: "opendir", errno: errno) }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}
