import BerthEngine
import BerthSystem
import BerthTestSupport
import Foundation
import XCTest

/// An engine adopting another's listening sockets (what `--takeover-socket` does between two
/// processes, here in one): connections queued while nobody accepts are served, whatever the
/// worker counts, and groups no frontend takes are closed on request.
final class EngineTakeoverTests: DataPlaneTestCase {
    func testQueuedConnectionsSurviveTheSwitchToAnEngineWithFewerWorkers() throws {
        let old = try taggedBackend(1), new = try taggedBackend(2)
        let (first, listening) = try startEngine(
            [Frontend(name: "svc", listen: loopbackAnyPort, backends: [Backend(old.address)]),
             Frontend(name: "gone", listen: loopbackAnyPort, backends: [Backend(old.address)])],
            configure: { $0.workers = 3 })
        let address = listening["svc"]!, gone = listening["gone"]!
        var batch = DescriptorBatch()
        defer { batch.close() }
        let offer = try first.exportListeners(version: "test", leaseID: 42, into: &batch)
        XCTAssertEqual(offer.frontends.map(\.name), ["gone", "svc"])
        XCTAssertEqual(offer.descriptorCount, 6)
        XCTAssertEqual(batch.count, 6)

        var configuration = EngineConfiguration()
        configuration.workers = 1
        let second = try Engine(configuration: configuration)
        engines.append(second)
        XCTAssertTrue(second.adopt(offer, descriptors: &batch))
        XCTAssertEqual(batch.count, 0, "the engine owns them now")
        first.shutdown(drainTimeout: 0)

        // Nobody accepts now: these wait in the three sockets' queues (the kernel spreads them).
        var clients: [CInt] = []
        defer { for fd in clients { close(fd) } }
        for _ in 0..<30 { clients.append(try TestSocket.connect(address)) }

        let result = try second.apply(RoutingTable(revision: 1, frontends: [
            Frontend(name: "svc", listen: address, backends: [Backend(new.address)]),
        ]))
        XCTAssertEqual(result.listening["svc"], address)
        for (index, fd) in clients.enumerated() {
            XCTAssertEqual(try TestSocket.receiveExactly(fd, 1), [2], "queued connection \(index) served by the new engine")
        }
        XCTAssertEqual(second.closeUnusedAdopted(), [gone], "the frontend the new table lacks")
        XCTAssertThrowsError(try TestSocket.connect(gone, timeout: 1), "its port is closed")
    }

    func testAdoptRefusesACountMismatch() throws {
        let (first, _) = try startEngine([Frontend(name: "svc", listen: loopbackAnyPort, backends: [])])
        var batch = DescriptorBatch()
        defer { batch.close() }
        var offer = try first.exportListeners(version: "test", leaseID: nil, into: &batch)
        offer.frontends[0].count += 1
        let second = try Engine(configuration: EngineConfiguration())
        engines.append(second)
        XCTAssertFalse(second.adopt(offer, descriptors: &batch))
        XCTAssertEqual(batch.count, 2, "left with the caller, who closes them")
    }
}
