import BerthEngine
import BerthSystem
import Glibc
import XCTest

/// The takeover messages (pure codec) and descriptors passed over a real socket pair.
final class TakeoverMessageTests: XCTestCase {
    static let offer = TakeoverOffer(version: "1.2.3 (build 7)", leaseID: 7_587_868_213_473_402_123, frontends: [
        .init(name: "web", requested: try! SocketAddress(parsing: "0.0.0.0:80"), bound: try! SocketAddress(parsing: "0.0.0.0:80"), count: 4),
        .init(name: "a name with spaces, % and\nnewline", requested: try! SocketAddress(parsing: "[::1]:0"),
              bound: try! SocketAddress(parsing: "[::1]:40123"), count: 1),
        .init(name: "", requested: try! SocketAddress(parsing: "127.0.0.1:9000"), bound: try! SocketAddress(parsing: "127.0.0.1:9000"), count: 2),
    ])

    func testEveryMessageRoundTrips() throws {
        let messages: [TakeoverMessage] = [
            .hello(protocolVersion: 1, version: "0.1.0"), .hello(protocolVersion: 9, version: ""),
            .offer(Self.offer), .offer(TakeoverOffer(version: "x")), .takenOver, .abort(reason: "no table in 30 s"),
        ]
        for message in messages {
            XCTAssertEqual(try TakeoverMessage.decode(message.encode()), message)
        }
        XCTAssertEqual(Self.offer.descriptorCount, 7)
    }

    func testGarbageIsAnErrorNeverACrash() {
        let samples = ["", "\n", "GET / HTTP/1.1\r\n\r\n", "berth-takeover\n", "berth-takeover x hello\nversion 1\n",
                       "berth-takeover 1 hello\n", "berth-takeover 1 hello\nversion 1\nextra line\n",
                       "berth-takeover 1 offer\nversion 1\nlease twelve\n", "berth-takeover 1 offer\nversion 1\nlease none\nfrontend a 1.2.3.4:5 1.2.3.4:5 0\n",
                       "berth-takeover 1 offer\nversion 1\nlease none\nfrontend a nowhere 1.2.3.4:5 1\n",
                       "berth-takeover 1 offer\nversion 1\nlease none\nfrontend %zz 1.2.3.4:5 1.2.3.4:5 1\n",
                       "berth-takeover 1 surrender\n"]
        for sample in samples {
            XCTAssertThrowsError(try TakeoverMessage.decode(Array(sample.utf8)), "accepted: \(sample.debugDescription)")
        }
        XCTAssertThrowsError(try TakeoverMessage.decode([0xff, 0xfe, 0x0a]))
        var random = SystemRandomNumberGenerator()
        for _ in 0..<2_000 {
            let bytes = (0..<Int.random(in: 0..<64, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            _ = try? TakeoverMessage.decode(bytes)
        }
    }

    func testEveryTruncationOfAnOfferIsRejected() {
        let bytes = TakeoverMessage.offer(Self.offer).encode()
        for length in 0..<bytes.count {
            let prefix = Array(bytes[0..<length])
            // A cut exactly after a whole frontend line is a shorter valid offer: never longer.
            if let decoded = try? TakeoverMessage.decode(prefix), case .offer(let offer) = decoded {
                XCTAssertLessThan(offer.frontends.count, Self.offer.frontends.count, "cut at \(length)")
            }
        }
        XCTAssertThrowsError(try TakeoverMessage.decode(Array(bytes.dropLast())))
    }

    func testFrameLengthIsBounded() {
        XCTAssertEqual(TakeoverFrame.length(header: Array(TakeoverFrame.encode([1, 2, 3]).prefix(4))), 3)
        XCTAssertNil(TakeoverFrame.length(header: [0xff, 0xff, 0xff, 0xff]))
    }

    /// Listening sockets sent with SCM_RIGHTS arrive as working copies; more than asked for
    /// are closed and reported.
    func testDescriptorsPassOverASocketPair() throws {
        let openBefore = try openDescriptorCount()
        var pair: [CInt] = [-1, -1]
        XCTAssertEqual(socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue) | CInt(SOCK_CLOEXEC.rawValue), 0, &pair), 0)
        defer { close(pair[0]); close(pair[1]) }
        var listener = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: true)
        defer { listener.close() }
        let address = try Sockets.localAddress(listener.raw)
        try UnixSockets.setTimeout(pair[1], milliseconds: 2_000)
        try UnixSockets.send(pair[0], TakeoverFrame.encode([]), descriptors: [listener.raw, listener.raw])
        var batch = DescriptorBatch()
        defer { batch.close() }
        XCTAssertEqual(try UnixSockets.receive(pair[1], count: 4, descriptors: &batch, capacity: 2), [0, 0, 0, 0])
        XCTAssertEqual(batch.count, 2)
        XCTAssertEqual(try Sockets.localAddress(batch.fds[0]), address, "the received socket is the listener")

        try UnixSockets.send(pair[0], [1], descriptors: [listener.raw, listener.raw])
        var extra = DescriptorBatch()
        XCTAssertThrowsError(try UnixSockets.receive(pair[1], count: 1, descriptors: &extra, capacity: 1)) { error in
            XCTAssertEqual((error as? SystemError)?.errno, EPROTO)
        }
        XCTAssertEqual(extra.count, 1, "one kept, the other closed")
        extra.close()
        batch.close()
        XCTAssertEqual(try openDescriptorCount(), openBefore + 3, "only the pair and the listener are open")
    }

    private func openDescriptorCount() throws -> Int {
        guard let directory = opendir("/proc/self/fd") else { throw SystemError(call: "opendir", errno: errno) }
        defer { closedir(directory) }
        var count = 0
        while readdir(directory) != nil { count += 1 }
        return count
    }
}
