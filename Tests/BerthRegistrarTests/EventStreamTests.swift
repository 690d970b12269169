// The Docker client against a fake Docker Engine on a unix socket: garbage and unknown lines on
// the event stream are skipped and counted, a dropped stream is reconnected, a lost event is
// repaired by the resync that follows every reconnect. (A real dockerd never sends garbage.)
@testable import BerthRegistrar
import BerthTestSupport
import Foundation
import NIOCore
import NIOPosix
import Synchronization
import XCTest

/// A scripted Docker Engine: each `/events` connection plays the next script, then closes the
/// stream or keeps it open; `/containers/json` and inspect answer from `running`.
final class FakeDocker: Sendable {
    struct Script: Sendable {
        var lines: [String]
        /// Containers running once this script has played.
        var running: Set<String>
        var close: Bool
    }

    let path: String
    private let state = Mutex<(scripts: [Script], running: Set<String>, eventConnections: Int, requests: [String])>(([], [], 0, []))
    private let channel: Mutex<Channel?> = Mutex(nil)

    init(scripts: [Script], path: String? = nil) async throws {
        self.path = path ?? "\(NSTemporaryDirectory())berth-fake-docker-\(getpid())-\(Int.random(in: 0..<1_000_000)).sock"
        state.withLock { $0.scripts = scripts }
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(Handler(docker: self)) }
            }
            .bind(unixDomainSocketPath: self.path, cleanupExistingSocketFile: true).get()
        channel.withLock { $0 = server }
    }

    var eventConnections: Int { state.withLock { $0.eventConnections } }

    func stop() async {
        let server = channel.withLock { $0 }
        try? await server?.close()
        unlink(path)
    }

    static func inspect(_ id: String, port: Int) -> String {
        #"{"Id":"\#(id)","Name":"/fake","Config":{"Image":"berth-test/whoami:latest","Labels":{},"Env":[]},"State":{"Running":true},"NetworkSettings":{"Ports":{"8000/tcp":[{"HostIp":"127.0.0.1","HostPort":"\#(port)"}]}}}"#
    }

    /// The raw HTTP answer to one request line's path.
    fileprivate func answer(_ target: String) -> (bytes: String, close: Bool) {
        state.withLock { state in
            state.requests.append(target)
            if target.hasPrefix("/events") {
                state.eventConnections += 1
                guard !state.scripts.isEmpty else { return (Self.chunkedHead, false) }
                let script = state.scripts.removeFirst()
                state.running = script.running
                let body = script.lines.map { line -> String in
                    let data = line + "\n"
                    return String(data.utf8.count, radix: 16) + "\r\n" + data + "\r\n"
                }.joined()
                return (Self.chunkedHead + body, script.close)
            }
            if target.hasPrefix("/containers/json") {
                let list = state.running.sorted().map { #"{"Id":"\#($0)","State":"running","Ports":[{"IP":"127.0.0.1","PrivatePort":8000,"PublicPort":40000,"Type":"tcp"}]}"# }
                return (Self.plain(200, "[" + list.joined(separator: ",") + "]"), true)
            }
            let parts = target.split(separator: "/")
            if parts.count == 3, parts[0] == "containers", parts[2] == "json", state.running.contains(String(parts[1])) {
                return (Self.plain(200, Self.inspect(String(parts[1]), port: 40000)), true)
            }
            return (Self.plain(404, #"{"message":"No such container"}"#), true)
        }
    }

    private static let chunkedHead = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"

    private static func plain(_ status: Int, _ body: String) -> String {
        "HTTP/1.1 \(status) X\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let docker: FakeDocker
        var request = ""
        var answered = false

        init(docker: FakeDocker) { self.docker = docker }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            request += String(buffer: unwrapInboundIn(data))
            guard !answered, request.contains("\r\n\r\n") else { return }
            answered = true
            let target = request.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
            let (bytes, close) = docker.answer(target)
            let written = context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: bytes)))
            if close {
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                written.whenComplete { _ in loopBound.value.close(promise: nil) }
            }
        }
    }
}

final class EventStreamTests: XCTestCase {
    private let id = String(repeating: "ab", count: 32)

    func testGarbageLinesAreSkippedAndADroppedStreamReconnects() async throws {
        let garbage = ["not json at all", "{\"half\":", "[1,2,3]", #"{"Type":"network","Action":"connect","Actor":{"ID":"aa"}}"#,
                       #"{"Type":"container","Action":"start"}"#, String(repeating: "x", count: 2 << 20)]
        let start = #"{"status":"start","id":"\#(id)","Type":"container","Action":"start","Actor":{"ID":"\#(id)","Attributes":{}}}"#
        let die = #"{"status":"die","id":"\#(id)","Type":"container","Action":"die","Actor":{"ID":"\#(id)","Attributes":{}}}"#
        let docker = try await FakeDocker(scripts: [
            .init(lines: garbage + [start], running: [id], close: true),
            .init(lines: ["\u{1}\u{2}garbage", die], running: [], close: false),
        ])
        let store = InMemoryStore()
        var configuration = RegistrarConfiguration(ttlSeconds: 3, resyncInterval: .seconds(30), docker: try DockerClient(host: "unix://\(docker.path)"))
        configuration.reconnectInitial = .milliseconds(300)
        let registrar = Registrar(configuration: configuration, store: store)
        let task = Task { try await registrar.run() }

        let key = "/backends/whoami/\(id.prefix(12))"
        let registered = await eventually(timeout: 3) { store.values[key] != nil }
        XCTAssertNotNil(registered, "the container of the first stream was not registered")
        XCTAssertEqual(store.values[key], #"{"host":"127.0.0.1","port":40000,"listen":8000,"weight":1,"meta":{"container":"fake","image":"berth-test/whoami:latest"}}"#)
        let reconnected = await eventually(timeout: 10) { docker.eventConnections >= 2 && store.values[key] == nil }
        XCTAssertNotNil(reconnected, "the dropped stream was not reconnected, or the die event not applied")
        let status = registrar.status
        XCTAssertEqual(status.eventsSkipped, garbage.count + 1)
        XCTAssertGreaterThanOrEqual(status.eventsSeen, 2)
        XCTAssertGreaterThanOrEqual(status.dockerReconnects, 1)
        XCTAssertTrue(status.dockerConnected)

        registrar.shutdown()
        try await task.value
        await docker.stop()
    }

    func testKillWithATerminatingSignalMarksDrainingUntilDeath() async throws {
        let start = #"{"Type":"container","Action":"start","Actor":{"ID":"\#(id)"}}"#
        let hangup = #"{"Type":"container","Action":"kill","Actor":{"ID":"\#(id)","Attributes":{"signal":"1"}}}"#
        let terminate = #"{"Type":"container","Action":"kill","Actor":{"ID":"\#(id)","Attributes":{"signal":"15"}}}"#
        let docker = try await FakeDocker(scripts: [.init(lines: [start, hangup, terminate], running: [id], close: false)])
        let store = InMemoryStore()
        let configuration = RegistrarConfiguration(ttlSeconds: 3, docker: try DockerClient(host: "unix://\(docker.path)"))
        let registrar = Registrar(configuration: configuration, store: store)
        let task = Task { try await registrar.run() }
        let key = "/backends/whoami/\(id.prefix(12))"
        await assertEventually(timeout: 3, "kill 15 did not mark the instance draining") {
            store.values[key]?.contains(#""draining":true"#) == true
        }
        // Every value written for the key: the SIGHUP never drained it, SIGTERM did.
        XCTAssertEqual(registrar.status.eventsSeen, 3)
        registrar.shutdown()
        try await task.value
        await docker.stop()
    }

    func testUnreachableDockerIsRetriedAndStaticsStillRegister() async throws {
        let store = InMemoryStore()
        let path = "\(NSTemporaryDirectory())berth-no-docker-\(getpid()).sock"
        var configuration = RegistrarConfiguration(ttlSeconds: 3, statics: [try StaticService(parsing: "s=127.0.0.1:9").registration],
                                                   docker: try DockerClient(host: "unix://\(path)"))
        configuration.reconnectMaximum = .milliseconds(200)
        let registrar = Registrar(configuration: configuration, store: store)
        let task = Task { try await registrar.run() }
        await assertEventually(timeout: 2) { store.values.count == 1 }
        XCTAssertFalse(registrar.status.dockerConnected)

        // Docker appears later: followed within the capped backoff.
        let docker = try await FakeDocker(scripts: [], path: path)
        await assertEventually(timeout: 2, "Docker not followed once it appeared") { registrar.status.dockerConnected }
        registrar.shutdown()
        try await task.value
        await docker.stop()
    }

    func testDockerHostParsing() throws {
        XCTAssertEqual(try DockerClient.socketPath(fromHost: "unix:///var/run/docker.sock"), "/var/run/docker.sock")
        XCTAssertEqual(try DockerClient.socketPath(fromHost: "/run/d.sock"), "/run/d.sock")
        XCTAssertThrowsError(try DockerClient.socketPath(fromHost: "tcp://127.0.0.1:2375"))
        XCTAssertThrowsError(try DockerClient.socketPath(fromHost: "unix://relative"))
    }
}
