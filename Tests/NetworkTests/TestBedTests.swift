// The bed itself: hosts reach each other, and each fault does what it says (so that a matrix
// test that passes under a fault did face it).
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class TestBedTests: XCTestCase {
    override func setUpWithError() throws {
        if let reason = NetworkTestBed.unavailableReason() { throw XCTSkip(reason) }
        signal(SIGPIPE, SIG_IGN)
    }

    func testFaults() throws {
        let bed = try NetworkTestBed(hosts: ["one", "two"])
        defer { bed.remove() }
        let two = bed.host("two")
        XCTAssertTrue(try bed.run(in: "one", "ip", ["-o", "addr", "show", "eth0"]).contains(bed.host("one").address))
        let listener = try bed.withNetwork(of: "two") { try SilentListener(host: two.address, port: 0) }
        defer { listener.stop() }
        /// Seconds a connect from `one` to the listener takes, or nil when it fails within 1.5 s.
        func connectTime() throws -> Double? {
            try bed.withNetwork(of: "one") {
                let start = monotonicSeconds()
                let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                defer { close(fd) }
                var limit = timeval(tv_sec: 1, tv_usec: 500_000)
                setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
                var address = sockaddr_in()
                address.sin_family = sa_family_t(AF_INET)
                address.sin_port = UInt16(listener.port).bigEndian
                inet_pton(AF_INET, two.address, &address.sin_addr)
                let result = withUnsafePointer(to: &address) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
                return result == 0 ? monotonicSeconds() - start : nil
            }
        }
        let plain = try XCTUnwrap(try connectTime(), "no connection between two bed hosts")
        XCTAssertLessThan(plain, 0.1)
        XCTAssertNotNil(waitUntil(timeout: 2) { listener.accepted >= 1 })

        try bed.partition("one", from: "two")
        XCTAssertNil(try connectTime(), "a partition let a SYN through")
        try bed.heal("one", from: "two")
        XCTAssertNotNil(try connectTime(), "heal did not restore the path")

        try bed.delay("two", milliseconds: 150)
        let delayed = try XCTUnwrap(try connectTime())
        print("connect: \(milliseconds(plain)) plain, \(milliseconds(delayed)) with 150 ms delay on the answering host")
        XCTAssertGreaterThanOrEqual(delayed, 0.15, "the SYN-ACK was not delayed")
        XCTAssertLessThan(delayed, 0.5)
        try bed.delay("two", milliseconds: 300)
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(try connectTime()), 0.3, "the delay did not change")
        try bed.clearImpairments("two")
        XCTAssertLessThan(try XCTUnwrap(try connectTime()), 0.1, "the delay stayed after clearImpairments")

        try bed.loss("two", percent: 100)
        XCTAssertNil(try connectTime(), "100% loss let a SYN-ACK through")
        try bed.clearImpairments("two")
        XCTAssertNotNil(try connectTime())

        try bed.setLink("two", up: false)
        XCTAssertNil(try connectTime(), "link down let a SYN through")
        try bed.setLink("two", up: true)
        XCTAssertNotNil(waitUntil(timeout: 5, interval: 0.1) { (try? connectTime()) != nil }, "link up did not restore the path")
        XCTAssertGreaterThanOrEqual(listener.accepted, 5)
    }

    /// remove() deletes every namespace of the bed and kills its processes; a second call is harmless.
    func testRemoveLeavesNothing() throws {
        let bed = try NetworkTestBed(hosts: ["solo"])
        let sleeper = try bed.spawn(in: "solo", "/bin/sleep", ["60"])
        try bed.delay("solo", milliseconds: 10)
        XCTAssertTrue(sleeper.isRunning)
        bed.remove()
        bed.remove()
        XCTAssertFalse(sleeper.isRunning)
        let left = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        XCTAssertEqual(left.filter { $0.hasPrefix(bed.prefix + "-") }, [])
    }

    /// A new bed removes the namespaces of test processes that died before removing theirs.
    func testLeftoversOfDeadRunsAreRemoved() throws {
        var dead: pid_t = 4_000_000
        while kill(dead, 0) == 0 || errno != ESRCH { dead += 1 }
        let leftover = "berth-\(dead)-1-gone"
        let added = try SpawnedProcess.run("ip", ["netns", "add", leftover], timeout: 10)
        XCTAssertEqual(added.code, 0, added.error)
        let bed = try NetworkTestBed(hosts: ["solo"])
        defer { bed.remove() }
        let left = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        XCTAssertFalse(left.contains(leftover), "a dead run's namespace was left")
        XCTAssertTrue(left.contains(bed.host("solo").namespace))
    }
}
