import FoundationEssentials
import NIOCore
import NIOHTTP1
import NIOPosix

/// A small blocking HTTP/1.1 client for `berth ctl`: one request to a stats server, bounded in
/// time and size. Not for use on an event loop (it waits).
public enum StatsClient {
    public struct Response: Sendable {
        public var status: Int
        public var body: String
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    /// Where a stats server is: `http://HOST:PORT` (or `HOST:PORT`; the port defaults to 1936).
    public struct Target: Sendable, Equatable {
        public var host: String
        public var port: Int

        public init(parsing text: String) throws {
            var rest = Substring(text)
            if rest.hasPrefix("http://") { rest = rest.dropFirst(7) } else if rest.contains("://") {
                throw Failure(description: "invalid stats URL '\(text)': only http:// is served")
            }
            if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
            var host = rest
            var port = 1936
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]") else { throw Failure(description: "invalid stats URL '\(text)'") }
                host = rest[rest.index(after: rest.startIndex)..<close]
                let after = rest[rest.index(after: close)...]
                if after.hasPrefix(":") {
                    guard let parsed = Int(after.dropFirst()) else { throw Failure(description: "invalid port in '\(text)'") }
                    port = parsed
                }
            } else if let colon = rest.lastIndex(of: ":") {
                host = rest[..<colon]
                guard let parsed = Int(rest[rest.index(after: colon)...]) else { throw Failure(description: "invalid port in '\(text)'") }
                port = parsed
            }
            guard !host.isEmpty, (1...65535).contains(port) else { throw Failure(description: "invalid stats URL '\(text)'") }
            self.host = host == "0.0.0.0" ? "127.0.0.1" : String(host)
            self.port = port
        }
    }

    /// Sends one request and reads the whole response (at most `limit` bytes of body).
    /// `method` is `GET` or `POST` (the methods the stats server answers).
    public static func request(_ method: String, _ path: String, to target: Target,
                               authorization: String?, timeoutMilliseconds: Int64 = 5_000,
                               limit: Int = 16 << 20) throws -> Response {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        let promise = loop.makePromise(of: Response.self)
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.milliseconds(timeoutMilliseconds))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise, limit: limit))
                }
            }
        let channel: Channel
        do {
            channel = try bootstrap.connect(host: target.host, port: target.port).wait()
        } catch {
            throw Failure(description: "cannot connect to \(target.host):\(target.port): \(error)")
        }
        let timeout = loop.scheduleTask(in: .milliseconds(timeoutMilliseconds)) {
            promise.fail(Failure(description: "no answer from \(target.host):\(target.port) within \(timeoutMilliseconds) ms"))
        }
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "\(target.host):\(target.port)")
        headers.add(name: "Connection", value: "close")
        headers.add(name: "Content-Length", value: "0")
        if let authorization { headers.add(name: "Authorization", value: authorization) }
        let head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path, headers: headers)
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        defer {
            timeout.cancel()
            channel.close(promise: nil)
        }
        return try promise.futureResult.wait()
    }
}

/// Collects one response; fails the promise if the connection ends first or the body is too big.
private final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let promise: EventLoopPromise<StatsClient.Response>
    private let limit: Int
    private var status = 0
    private var body: ByteBuffer?

    init(promise: EventLoopPromise<StatsClient.Response>, limit: Int) {
        self.promise = promise
        self.limit = limit
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
        case .body(var part):
            if (body?.readableBytes ?? 0) + part.readableBytes > limit {
                promise.fail(StatsClient.Failure(description: "response over \(limit) bytes"))
                context.close(promise: nil)
                return
            }
            if body == nil { body = part } else { body!.writeBuffer(&part) }
        case .end:
            promise.succeed(StatsClient.Response(status: status, body: body.map { String(buffer: $0) } ?? ""))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(StatsClient.Failure(description: "connection closed before a complete response"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.close(promise: nil)
    }
}
