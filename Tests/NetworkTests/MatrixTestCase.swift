// The base of the failure matrix's tests: skips where the bed cannot run, builds one Scene per
// test, removes it at teardown whatever happened (printing every process' log when the test
// failed), and checks that the test process leaked no descriptor.
import BerthTestSupport
import Foundation
import Glibc
import XCTest

class MatrixTestCase: XCTestCase {
    private(set) var scene: Scene?
    private var openAtStart: [String: String] = [:]

    static func openDescriptors() -> [String: String] { openDescriptorMap() }

    /// What the process opens once in its life (a first child, Foundation's JSON, the bed's
    /// availability probe, libdispatch's timers) is opened before any test counts descriptors.
    override class func setUp() {
        super.setUp()
        _ = NetworkTestBed.unavailableReason()
        _ = try? SpawnedProcess.run("/bin/true", [], timeout: 5)
        _ = try? JSONSerialization.jsonObject(with: Data("{}".utf8))
        // libdispatch opens its event loop's epoll, eventfd and timerfds on the first timer
        // (Foundation and XCTest arm some at unpredictable moments): open them now.
        let fired = DispatchSemaphore(value: 0)
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.001) { fired.signal() }
        DispatchQueue.global().asyncAfter(wallDeadline: .now() + 0.001) { fired.signal() }
        _ = fired.wait(timeout: .now() + 2)
        _ = fired.wait(timeout: .now() + 2)
    }

    override func setUpWithError() throws {
        try super.setUpWithError()
        if let reason = NetworkTestBed.unavailableReason() { throw XCTSkip(reason) }
        guard access(EtcdFixture.etcdPath, X_OK) == 0 else { throw XCTSkip("etcd is not installed (etcd-server)") }
        guard access(BerthBinary.path, X_OK) == 0 else {
            throw FixtureFailure("the berth binary is missing at \(BerthBinary.path): run `swift build` first or set BERTH_BINARY")
        }
        signal(SIGPIPE, SIG_IGN)
        openAtStart = Self.openDescriptors()
    }

    /// The scene of this test: bed, etcd, backends and registrars running.
    func makeScene(_ options: Scene.Options = Scene.Options()) throws -> Scene {
        let scene = try Scene()
        self.scene = scene
        try scene.startBackends(options)
        return scene
    }

    override func tearDown() {
        if let scene {
            // Every process' log when the test failed, or always with NETWORK_TESTS_LOGS=1.
            if (testRun?.failureCount ?? 0) > 0 || ProcessInfo.processInfo.environment["NETWORK_TESTS_LOGS"] == "1" {
                print(scene.logs())
            }
            scene.remove()
        }
        scene = nil
        var current = Self.openDescriptors()
        for _ in 0..<100 where current.count > openAtStart.count {
            usleep(20_000)
            current = Self.openDescriptors()
        }
        let opened = current.filter { openAtStart[$0.key] != $0.value }
        XCTAssertLessThanOrEqual(current.count, openAtStart.count, "the test process leaked descriptors: \(opened.sorted { $0.key < $1.key })")
        super.tearDown()
    }

    /// Polls `condition` every `interval` seconds for at most `timeout`; the seconds it took.
    func measure(timeout: Double, interval: Double = 0.05, _ condition: () -> Bool) -> Double? {
        waitUntil(timeout: timeout, interval: interval, condition)
    }
}
