import BerthSystem
import XCTest

/// The event-loop core's token scheme and slot table (pure).
final class EventLoopCoreTests: XCTestCase {
    final class Item: Slotted {
        let slot: Int32
        var generation: UInt32 = 0
        var isLive = false

        init(slot: Int32) {
            self.slot = slot
        }
    }

    func testTokensCarryKindSlotAndGeneration() {
        let token = EventToken.make(kind: 3, slot: 0x3FFF_FFFF, generation: .max)
        XCTAssertEqual(EventToken.kind(token), 3)
        XCTAssertEqual(EventToken.slot(token), 0x3FFF_FFFF)
        XCTAssertEqual(EventToken.generation(token), .max)
        XCTAssertNotEqual(EventToken.make(kind: 1, slot: 0, generation: 0), EventToken.wakeup)
    }

    func testAReleasedSlotIsReusedUnderANewGenerationAndOldTokensAreStale() {
        var table = SlotTable<Item>()
        let first = table.take { Item(slot: $0) }
        first.isLive = true
        let second = table.take { Item(slot: $0) }
        second.isLive = true
        XCTAssertEqual([first.slot, second.slot], [0, 1])
        let oldToken = EventToken.make(kind: 2, slot: first.slot, generation: first.generation)
        XCTAssertTrue(table.lookup(token: oldToken) === first)

        first.isLive = false
        table.release(first)
        XCTAssertNil(table.lookup(token: oldToken), "a released slot answers no token")
        let reused = table.take { Item(slot: $0) }
        XCTAssertTrue(reused === first, "the freed slot is handed out again")
        reused.isLive = true
        XCTAssertNil(table.lookup(token: oldToken), "a token of the slot's previous use stays stale")
        XCTAssertTrue(table.lookup(token: EventToken.make(kind: 2, slot: reused.slot, generation: reused.generation)) === reused)
        XCTAssertNil(table.lookup(slot: 7, generation: 0), "a slot never handed out")
        XCTAssertEqual(table.live.count, 2)
        XCTAssertTrue(table.lookup(DeadlineHeap.Entry(deadline: 5, slot: second.slot, generation: second.generation)) === second)
    }
}
