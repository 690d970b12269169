import BerthHealth
import FoundationEssentials
import NIOCore
import NIOHTTP1

/// Answers one request: checks credentials, renders the page or applies the admin action.
/// Threads: the stats event loop only (the collector is loop-bound).
struct StatsResponder {
    let collector: StatsCollector
    let credentials: StatsCredentials?

    func respond(method: String, target: String, authorization: String?) -> StatsResponse {
        let route = StatsRoute.resolve(method: method, target: target)
        if route.needsCredentials, let credentials, !credentials.accepts(authorization) {
            var response = StatsResponse.text(401, "authentication required")
            response.extraHeaders = [("WWW-Authenticate", "Basic realm=\"berth stats\", charset=\"UTF-8\"")]
            return response
        }
        switch route {
        case .healthz:
            return .text(200, "ok")
        case .failure(let status, let reason):
            return .text(status, reason)
        case .html(let refresh):
            return StatsResponse(status: 200, contentType: "text/html; charset=utf-8",
                                 body: HTMLRenderer.render(collector.snapshot(), refresh: refresh))
        case .csv:
            return StatsResponse(status: 200, contentType: "text/csv; charset=utf-8", body: CSVRenderer.render(collector.snapshot()))
        case .json:
            let body = (try? JSONEncoder.sorted.encode(collector.snapshot())).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
            return StatsResponse(status: 200, contentType: "application/json", body: body + "\n")
        case .metrics:
            return StatsResponse(status: 200, contentType: "text/plain; version=0.0.4; charset=utf-8",
                                 body: MetricsRenderer.render(collector.snapshot()))
        case .admin(let service, let backend, let action):
            // Admin needs credentials configured: without --stats-auth nobody may change state.
            guard credentials != nil, let apply = collector.provider.setAdminState else {
                return .text(403, "the admin API is off: start berth with --stats-auth USER:PASS")
            }
            do throws(AdminError) {
                try apply(action, BackendKey(frontend: service, backend: backend))
            } catch {
                if case .unknownBackend = error { return .json(404, ["error": error.description]) }
                return .json(500, ["error": error.description])
            }
            return .json(200, ["service": service, "backend": backend, "state": action.rawValue])
        }
    }
}

/// One stats connection. The pipeline is NIO's HTTP/1.1 server pipeline (decoder with header
/// limits, encoder, pipelining assistance: one request handled at a time, reads paused meanwhile)
/// and this handler. Bounds (`StatsServerConfiguration`): a complete request must arrive within
/// `requestTimeout` of the connection opening or of the previous response (slowloris), a
/// response must be taken by the client within `writeTimeout`, headers over `maxHeaderBytes` get
/// 431, bodies over `maxBodyBytes` 413, anything unparseable 400, and each of those closes.
final class StatsHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let responder: StatsResponder
    private let limits: StatsServerConfiguration
    private var head: HTTPRequestHead?
    private var bodyBytes = 0
    private var deadline: Scheduled<Void>?
    /// A response that ends the connection was sent: ignore whatever follows.
    private var closing = false
    /// Responses whose write has not completed (pipelined requests may overlap them).
    private var responding = 0
    /// The client closed its sending side: answer what came, then close.
    private var inputClosed = false

    init(responder: StatsResponder, limits: StatsServerConfiguration) {
        self.responder = responder
        self.limits = limits
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { arm(context, milliseconds: limits.requestTimeout) }
    }

    func channelActive(context: ChannelHandlerContext) {
        arm(context, milliseconds: limits.requestTimeout)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        deadline = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        switch Self.unwrapInboundIn(data) {
        case .head(let request):
            head = request
            bodyBytes = 0
        case .body(let buffer):
            bodyBytes += buffer.readableBytes
            if bodyBytes > limits.maxBodyBytes {
                send(context, .text(413, "request body over \(limits.maxBodyBytes) bytes", close: true), keepAlive: false, method: .GET)
            }
        case .end:
            guard let request = head else { return }
            head = nil
            let response = responder.respond(method: request.method.rawValue, target: request.uri,
                                             authorization: request.headers.first(name: "authorization"))
            send(context, response, keepAlive: request.isKeepAlive && !response.close, method: request.method)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        guard !closing else { return }
        guard let parserError = error as? HTTPParserError else {
            // Resets, broken pipes: nothing to answer.
            closeNow(context)
            return
        }
        let response: StatsResponse = parserError == .headerOverflow
            ? .text(431, "request headers over \(limits.maxHeaderBytes) bytes", close: true)
            : .text(400, "bad request", close: true)
        send(context, response, keepAlive: false, method: .GET)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The client closed its side (NIO's pipelining handler delivers this after the requests
        // that came before it): nothing more will come; close once the last answer is written.
        if case ChannelEvent.inputClosed = event {
            inputClosed = true
            if responding == 0 { closeNow(context) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func send(_ context: ChannelHandlerContext, _ response: StatsResponse, keepAlive: Bool, method: HTTPMethod) {
        if !keepAlive { closing = true }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: String(response.body.utf8.count))
        headers.add(name: "Cache-Control", value: "no-cache")
        headers.add(name: "Server", value: "berth")
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        for (name, value) in response.extraHeaders { headers.add(name: name, value: value) }
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: response.status), headers: headers)
        // The client now has `writeTimeout` to take the response.
        arm(context, milliseconds: limits.writeTimeout)
        context.write(Self.wrapOutboundOut(.head(head)), promise: nil)
        if method != .HEAD && !response.body.isEmpty {
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: response.body)))), promise: nil)
        }
        responding += 1
        let written = context.writeAndFlush(Self.wrapOutboundOut(.end(nil)))
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        written.whenComplete { result in
            let (handler, context) = loopBound.value
            handler.responding -= 1
            if case .failure = result { return handler.closeNow(context) }
            if keepAlive && !(handler.inputClosed && handler.responding == 0) {
                handler.arm(context, milliseconds: handler.limits.requestTimeout)
            } else {
                handler.closeNow(context)
            }
        }
    }

    /// Replaces the connection's one deadline; when it passes, the connection closes.
    private func arm(_ context: ChannelHandlerContext, milliseconds: Int64) {
        deadline?.cancel()
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        deadline = context.eventLoop.scheduleTask(in: .milliseconds(milliseconds)) {
            let (handler, context) = loopBound.value
            handler.deadline = nil
            handler.closeNow(context)
        }
    }

    private func closeNow(_ context: ChannelHandlerContext) {
        closing = true
        deadline?.cancel()
        deadline = nil
        context.close(promise: nil)
    }
}
