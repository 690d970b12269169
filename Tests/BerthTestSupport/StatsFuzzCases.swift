import Foundation
/// Bad input for the stats server, one connection's worth at a time: shared by
/// `BerthStatsTests.FuzzTests` (debug build, in process) and the bench's `stats-fuzz` role
/// (release build, against `berth proxy --stats`), so that both throw the same mix.
public enum StatsFuzzCases {
    public enum Kind: Int, CaseIterable, Sendable {
        /// 1 to 512 random bytes.
        case random
        /// A valid request with 1 to 4 bytes changed, inserted or cut.
        case mutated
        /// 100 pipelined requests that parse (one of the prepared `pipelines`), the last with
        /// `Connection: close`.
        case pipelined
        /// A request announcing a 10 MB body, with 16 KiB of it.
        case body
        /// A request with 1 MiB of headers.
        case headers
    }

    /// What to send on one connection.
    public struct Case: Sendable {
        public var kind: Kind
        public var payload: [UInt8]
        /// Requests the payload holds (100 when pipelined, else 1).
        public var requests: Int
    }

    /// Batches of 100 random requests that parse, made once per fuzzing thread (making them
    /// costs more than sending them).
    public static func pipelines(_ random: inout some RandomNumberGenerator, count: Int = 20) -> [[UInt8]] {
        (0..<count).map { _ in (0..<100).flatMap { randomRequest(&random, last: $0 == 99) } }
    }

    /// The next case: 45% random bytes, 25% mutated, 27% pipelined, 2% body, 1% headers.
    public static func next(_ random: inout some RandomNumberGenerator, pipelines: [[UInt8]]) -> Case {
        let valid = Array("GET /stats.json HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        switch Int.random(in: 0..<100, using: &random) {
        case 0..<45:
            let bytes = (0..<Int.random(in: 1...512, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            return Case(kind: .random, payload: bytes, requests: 1)
        case 45..<70:
            var payload = valid
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                let position = Int.random(in: 0..<payload.count, using: &random)
                switch Int.random(in: 0..<3, using: &random) {
                case 0: payload[position] = UInt8.random(in: 0...255, using: &random)
                case 1: payload.insert(UInt8.random(in: 0...255, using: &random), at: position)
                default: payload.remove(at: position)
                }
            }
            return Case(kind: .mutated, payload: payload, requests: 1)
        case 70..<97:
            return Case(kind: .pipelined, payload: pipelines[Int.random(in: 0..<pipelines.count, using: &random)], requests: 100)
        case 97..<99:
            let head = Array("POST /admin/backends/web/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n".utf8)
            return Case(kind: .body, payload: head + [UInt8](repeating: 0x41, count: 16 * 1024), requests: 1)
        default:
            let head = Array("GET / HTTP/1.1\r\nX-Big: ".utf8)
            return Case(kind: .headers, payload: head + [UInt8](repeating: 0x61, count: 1 << 20), requests: 1)
        }
    }

    /// A request that parses: random method, path, query, header names and values, sometimes
    /// credentials. One in ten asks for a rendered page; the rest for cheap answers (healthz,
    /// 404, 405, admin errors), so that 100,000 fit in a test's time on a loaded machine.
    public static func randomRequest(_ random: inout some RandomNumberGenerator, last: Bool) -> [UInt8] {
        let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
        let pages = ["/", "/stats", "/;csv", "/stats;csv", "/stats.json", "/metrics", "/?refresh="]
        let cheap = ["/healthz", "/admin/backends/web/a/", "/admin/backends/", "/%", "/;", "/x"]
        let printable = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%!$&'()*+,;=:@/?".utf8)
        func text(_ count: Int, _ random: inout some RandomNumberGenerator) -> String {
            String(decoding: (0..<count).map { _ in printable[Int.random(in: 0..<printable.count, using: &random)] }, as: UTF8.self)
        }
        var request = methods[Int.random(in: 0..<methods.count, using: &random)] + " "
        let paths = Int.random(in: 0..<10, using: &random) == 0 ? pages : cheap
        request += paths[Int.random(in: 0..<paths.count, using: &random)] + text(Int.random(in: 0...40, using: &random), &random)
        request += " HTTP/1.1\r\nHost: x\r\n"
        for _ in 0..<Int.random(in: 0...4, using: &random) {
            let name = String(decoding: (0..<Int.random(in: 1...12, using: &random)).map { _ in
                UInt8(ascii: "a") + UInt8.random(in: 0...25, using: &random)
            }, as: UTF8.self)
            request += "X-\(name): \(text(Int.random(in: 0...60, using: &random), &random))\r\n"
        }
        if Int.random(in: 0..<4, using: &random) == 0 { request += "Authorization: Basic \(text(16, &random))\r\n" }
        request += "Content-Length: 0\r\n"
        if last { request += "Connection: close\r\n" }
        return Array((request + "\r\n").utf8)
    }
}

/// SplitMix64: a fast seeded generator, so that a failing fuzz run can be replayed from its
/// printed seed (not for secrets).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed
    }

    /// A generator seeded from `BERTH_TEST_SEED` when set (to replay a failure), else at
    /// random; the seed is printed.
    public static func replayable() -> (generator: SplitMix64, seed: UInt64) {
        let seed = ProcessInfo.processInfo.environment["BERTH_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...UInt64.max)
        print("seed \(seed) (BERTH_TEST_SEED=\(seed) replays it)")
        return (SplitMix64(seed: seed), seed)
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
