import BerthEngine
import BerthSystem
import BerthHealth
import BerthStats
import Foundation
import Glibc
import XCTest

/// The admin API: `POST /admin/backends/SERVICE/BACKEND/drain|enable|maint` behind basic auth.
final class AdminTests: XCTestCase {
    private let credentials = StatsCredentials("admin:pw")!

    /// One request on a kept-alive connection: the whoami's identity.
    private func ask(_ fd: CInt) throws -> String {
        XCTAssertTrue(HTTP.send(fd, Array("GET / HTTP/1.1\r\nHost: t\r\n\r\n".utf8)))
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            if let response = HTTP.parse(received), let length = Int(response.headers["content-length"] ?? ""),
               response.body.utf8.count >= length {
                return response.body.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count > 0 else { throw HTTP.Failure(description: "connection ended after \(received.count) bytes") }
            received += buffer[0..<count]
        }
    }

    private func post(_ stack: StatsStack, _ path: String, authorization: String?) throws -> HTTP.Response {
        try HTTP.request(stack.statsAddress, "POST", path, authorization: authorization)
    }

    func testDrainKeepsOpenConnectionsAndSendsNewOnesElsewhere() throws {
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"])], credentials: "admin:pw")
        defer { stack.stop() }
        let front = stack.frontends["web"]!
        let open = try HTTP.connect(front)
        defer { close(open) }
        let first = try ask(open)
        XCTAssertTrue(first == "I'm a" || first == "I'm b", first)
        let drained = first == "I'm a" ? "a" : "b"
        let other = drained == "a" ? "b" : "a"

        // Without credentials, or with wrong ones: 401 and nothing changes.
        XCTAssertEqual(try post(stack, "/admin/backends/web/\(drained)/drain", authorization: nil).status, 401)
        XCTAssertEqual(try post(stack, "/admin/backends/web/\(drained)/drain", authorization: "Basic YWRtaW46bm8=").status, 401)
        XCTAssertEqual(stack.router.adminStates(), [:])

        let response = try post(stack, "/admin/backends/web/\(drained)/drain", authorization: credentials.headerValue)
        XCTAssertEqual(response.status, 200, response.body)
        XCTAssertTrue(response.body.contains("\"state\" : \"drain\""), response.body)
        // The open connection still reaches the drained backend...
        for _ in 0..<3 { XCTAssertEqual(try ask(open), first, "open connections continue") }
        // ... and every new one goes to the other (the table reaches the workers at once).
        XCTAssertTrue(eventually(timeout: 2) { (try? HTTP.whoami(front)) == "I'm \(other)" })
        for _ in 0..<10 { XCTAssertEqual(try HTTP.whoami(front), "I'm \(other)", "new connections avoid the drained backend") }
        let page = try HTTP.request(stack.statsAddress, "GET", "/;csv", authorization: credentials.headerValue).body
        XCTAssertTrue(page.contains("web,\(drained),") && page.contains("DRAIN"), "the CSV says DRAIN")

        XCTAssertEqual(try post(stack, "/admin/backends/web/\(drained)/enable", authorization: credentials.headerValue).status, 200)
        var seen = Set<String>()
        for _ in 0..<6 { seen.insert(try HTTP.whoami(front)) }
        XCTAssertEqual(seen, ["I'm a", "I'm b"], "enable returns it to the rotation")
        XCTAssertEqual(try ask(open), first)
    }

    /// maint takes the backend out and pauses its checks; enable brings it back checked.
    func testMaintPausesChecks() throws {
        let checks = CheckSettings(kind: .tcp, interval: 50, timeout: 200, rise: 1, fall: 1)
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"])], checks: checks, credentials: "admin:pw")
        defer { stack.stop() }
        let key = BackendKey(frontend: "web", backend: "a")
        XCTAssertTrue(eventually(timeout: 3) { stack.router.health()[key]?.status == .up })
        XCTAssertEqual(try post(stack, "/admin/backends/web/a/maint", authorization: credentials.headerValue).status, 200)
        XCTAssertNil(stack.router.health()[key], "no checks in maintenance")
        for _ in 0..<4 { XCTAssertEqual(try HTTP.whoami(stack.frontends["web"]!), "I'm b") }
        let json = try HTTP.request(stack.statsAddress, "GET", "/stats.json", authorization: credentials.headerValue)
        let snapshot = try JSONDecoder().decode(StatsSnapshot.self, from: Data(json.body.utf8))
        XCTAssertEqual(snapshot.services[0].backends.map(\.status), [.maint, .up])
        XCTAssertEqual(try post(stack, "/admin/backends/web/a/enable", authorization: credentials.headerValue).status, 200)
        XCTAssertTrue(eventually(timeout: 3) { (stack.router.health()[key]?.checksDone ?? 0) > 0 }, "checked again")
        XCTAssertEqual(stack.router.adminStates(), [:])
    }

    func testAdminErrors() throws {
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a"])], credentials: "admin:pw")
        defer { stack.stop() }
        let auth = credentials.headerValue
        XCTAssertEqual(try post(stack, "/admin/backends/web/zzz/drain", authorization: auth).status, 404)
        XCTAssertEqual(try post(stack, "/admin/backends/nope/a/drain", authorization: auth).status, 404)
        XCTAssertEqual(try post(stack, "/admin/backends/web/a/explode", authorization: auth).status, 400)
        XCTAssertEqual(try post(stack, "/admin/backends/web", authorization: auth).status, 404)
        XCTAssertEqual(try HTTP.request(stack.statsAddress, "GET", "/admin/backends/web/a/drain", authorization: auth).status, 405)
        XCTAssertEqual(stack.router.adminStates(), [:])

        // Without --stats-auth the admin API is off for everyone.
        let open = try StatsStack(services: [.init(name: "web", backends: ["a"])])
        defer { open.stop() }
        XCTAssertEqual(try post(open, "/admin/backends/web/a/drain", authorization: nil).status, 403)
        XCTAssertEqual(try post(open, "/admin/backends/web/a/drain", authorization: auth).status, 403)
        XCTAssertEqual(open.router.adminStates(), [:])
        XCTAssertEqual(try HTTP.request(open.statsAddress, "GET", "/").status, 200, "pages open without --stats-auth")
        XCTAssertEqual(try post(open, "/admin/backends/web/a/weight/3", authorization: auth).status, 403)
    }

    /// `POST /admin/backends/SERVICE/BACKEND/weight/N|reset`: HAProxy's `set server weight`.
    func testWeightRoute() throws {
        let stack = try StatsStack(services: [.init(name: "web", backends: ["a", "b"])], credentials: "admin:pw")
        defer { stack.stop() }
        let auth = credentials.headerValue
        let name = stack.router.desiredTable().frontends[0].backends[0].name
        let key = BackendKey(frontend: "web", backend: name)
        let escaped = name.replacingOccurrences(of: ":", with: "%3A")
        XCTAssertEqual(try post(stack, "/admin/backends/web/\(escaped)/weight/7", authorization: nil).status, 401)
        let set = try post(stack, "/admin/backends/web/\(escaped)/weight/7", authorization: auth)
        XCTAssertEqual(set.status, 200, set.body)
        XCTAssertTrue(set.body.contains("\"weight\" : \"7\""), set.body)
        XCTAssertEqual(stack.router.weights()[key]?.weight, 7)
        let page = try HTTP.request(stack.statsAddress, "GET", "/", authorization: auth)
        XCTAssertTrue(page.body.contains("7 (set)"), "the page does not show the operator's weight")
        for bad in ["257", "-1", "x", "", "0007"] {
            XCTAssertEqual(try post(stack, "/admin/backends/web/\(escaped)/weight/\(bad)", authorization: auth).status, 400, bad)
        }
        XCTAssertEqual(try post(stack, "/admin/backends/web/zzz/weight/2", authorization: auth).status, 404)
        XCTAssertEqual(try post(stack, "/admin/backends/web/\(escaped)/weight", authorization: auth).status, 400)
        XCTAssertEqual(stack.router.weights()[key]?.weight, 7, "a refused request changed the weight")
        XCTAssertEqual(try post(stack, "/admin/backends/web/\(escaped)/weight/reset", authorization: auth).status, 200)
        XCTAssertEqual(stack.router.weights()[key], WeightInForce(weight: 1, warmup: Backend.fullWarmup, overridden: false))
    }
}
