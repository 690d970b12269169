import BerthRegistry
import BerthSystem
import FoundationEssentials
import NIOCore
import NIOHTTP1
import NIOPosix

public enum DockerError: Error, Sendable, CustomStringConvertible {
    /// `DOCKER_HOST` is not `unix://PATH`.
    case unsupportedHost(String)
    case connect(String)
    /// 404 from inspect: the container is gone.
    case notFound
    case status(Int, String)
    case badResponse(String)
    /// A response body beyond `DockerClient.maximumBodyBytes`.
    case tooLarge(String)

    public var description: String {
        switch self {
        case .unsupportedHost(let host): "unsupported DOCKER_HOST '\(host)': expected unix:///path/to/docker.sock"
        case .connect(let reason): "cannot connect to Docker: \(reason)"
        case .notFound: "no such container"
        case .status(let code, let path): "Docker answered \(code) to \(path)"
        case .badResponse(let reason): "unexpected answer from Docker: \(reason)"
        case .tooLarge(let path): "Docker's answer to \(path) is too large"
        }
    }
}

/// A client of the Docker Engine API over its unix socket, on SwiftNIO's HTTP/1.1 codec.
///
/// Every call opens its own connection (`Connection: close`) and closes it on every path,
/// including errors and cancellation (`NIOAsyncChannel.executeThenClose`). Plain requests have a
/// deadline (`requestTimeout`) and a body bound (`maximumBodyBytes`); the event stream has no
/// deadline (it is idle while nothing happens) and ends when Docker closes it or the calling task
/// is cancelled. Paths are unversioned, so the daemon answers in its own API version.
public struct DockerClient: Sendable {
    public let socketPath: String
    public let requestTimeout: Duration
    public static let maximumBodyBytes = 16 << 20
    private let group: any EventLoopGroup

    /// `host` as in `DOCKER_HOST`: `unix:///var/run/docker.sock` (a bare absolute path is accepted).
    public init(host: String = "unix:///var/run/docker.sock", requestTimeout: Duration = .seconds(5),
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws(DockerError) {
        self.socketPath = try Self.socketPath(fromHost: host)
        self.requestTimeout = requestTimeout
        self.group = group
    }

    public static func socketPath(fromHost host: String) throws(DockerError) -> String {
        if host.hasPrefix("unix://") {
            let path = String(host.dropFirst("unix://".count))
            guard path.hasPrefix("/"), path.utf8.count < 108 else { throw .unsupportedHost(host) }
            return path
        }
        if host.hasPrefix("/") && host.utf8.count < 108 { return host }
        throw .unsupportedHost(host)
    }

    /// Running (and paused) containers.
    public func listContainers() async throws -> [ContainerSummary] {
        try DockerJSON.summaries(from: try await get("/containers/json"))
    }

    /// One container; throws `DockerError.notFound` when it no longer exists.
    public func inspect(id: String) async throws -> ContainerInfo {
        guard DockerEventParser.isContainerID(id) else { throw DockerError.notFound }
        return try DockerJSON.container(from: try await get("/containers/\(id)/json"))
    }

    /// Follows `GET /events` with `DockerEventParser.filters`: calls `opened` once Docker has
    /// answered 200, then `received` with each chunk of the body as it arrives. Returns when Docker
    /// ends the stream; throws when it cannot be opened or breaks.
    public func followEvents(opened: () async -> Void, received: (ByteBuffer) async -> Void) async throws {
        let query = PercentEncoding.encode(DockerEventParser.filters)
        let path = "/events?filters=\(query)"
        let channel = try await connect()
        try await channel.executeThenClose { inbound, outbound in
            try await Self.sendRequest(path: path, outbound)
            var parts = inbound.makeAsyncIterator()
            let head = try await Self.responseHead(&parts, path: path)
            guard head.status == .ok else { throw DockerError.status(Int(head.status.code), "/events") }
            await opened()
            while let part = try await parts.next() {
                switch part {
                case .head: throw DockerError.badResponse("a second response head on the event stream")
                case .body(let buffer): await received(buffer)
                case .end: return
                }
            }
        }
    }

    /// A GET with a deadline; the body of a 2xx answer. 404 → `.notFound`. A connection that
    /// breaks before any answer (seen here: NIO's "I/O on closed channel" right after connecting)
    /// is tried once more: the request is idempotent.
    func get(_ path: String) async throws -> Data {
        do {
            return try await getOnce(path)
        } catch let error as DockerError {
            throw error
        } catch let error as TimedOut {
            throw error
        } catch {
            return try await getOnce(path)
        }
    }

    private func getOnce(_ path: String) async throws -> Data {
        try await withDeadline(requestTimeout, what: "GET \(path)") {
            let channel = try await connect()
            return try await channel.executeThenClose { inbound, outbound in
                try await Self.sendRequest(path: path, outbound)
                var parts = inbound.makeAsyncIterator()
                let head = try await Self.responseHead(&parts, path: path)
                var body = Data()
                while let part = try await parts.next() {
                    switch part {
                    case .head: throw DockerError.badResponse("a second response head")
                    case .body(let buffer):
                        guard body.count + buffer.readableBytes <= Self.maximumBodyBytes else { throw DockerError.tooLarge(path) }
                        body.append(contentsOf: buffer.readableBytesView)
                    case .end:
                        if head.status == .notFound { throw DockerError.notFound }
                        guard (200..<300).contains(head.status.code) else { throw DockerError.status(Int(head.status.code), path) }
                        return body
                    }
                }
                throw DockerError.badResponse("connection closed before the end of the answer to \(path)")
            }
        }
    }

    private func connect() async throws -> NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart> {
        do {
            return try await ClientBootstrap(group: group)
                .connectTimeout(.seconds(2))
                .connect(unixDomainSocketPath: socketPath) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw DockerError.connect("\(socketPath): \(error)")
        }
    }

    private static func sendRequest(path: String, _ outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>) async throws {
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
        head.headers.add(name: "Host", value: "docker")
        head.headers.add(name: "User-Agent", value: "berth")
        head.headers.add(name: "Connection", value: "close")
        try await outbound.write(.head(head))
        try await outbound.write(.end(nil))
    }

    private static func responseHead(_ parts: inout NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator, path: String) async throws -> HTTPResponseHead {
        guard let first = try await parts.next() else {
            throw DockerError.badResponse("connection closed before an answer to \(path)")
        }
        guard case .head(let head) = first else { throw DockerError.badResponse("answer to \(path) without a head") }
        return head
    }
}
