import BerthSystem
import Glibc

/// One run of one check against one backend: connect, then (per kind) a TLS handshake, an HTTP
/// request and its status line. Nonblocking; the checker's loop drives it with `advance` on each
/// readiness event and ends it at its timeout. Owned by the checker thread.
final class Probe {
    /// The probe's state machine.
    enum Stage {
        /// Nonblocking connect in flight. It has not passed until the socket reports writable:
        /// SO_ERROR is 0 while a SYN is unanswered (a silent host), so reading it earlier would
        /// pass a check that never reached anybody.
        case connecting
        /// TLS handshake in flight (`tls`, `https`).
        case handshaking
        /// Writing the HTTP request.
        case sending
        /// Reading until the status line is complete.
        case receiving
    }

    enum Next {
        /// Wait for the socket to be readable (true) or writable (false).
        case wait(readable: Bool)
        case finished(CheckResult)
    }

    /// Largest status line read before the check fails ("garbage or a 10 MB response").
    static let responseLimit = 16 * 1024

    let started: Int64
    private(set) var socket: Descriptor
    private var stage = Stage.connecting
    /// Still waiting for the connect to complete.
    var isConnecting: Bool { stage == .connecting && failure == nil }
    private let kind: CheckKind
    private let address: SocketAddress
    private var tls: TLSClient?
    private var request: [UInt8] = []
    private var sent = 0
    private var response: [UInt8] = []

    /// Starts the connect; a connect that fails at once is reported by the first `advance`.
    init(address: SocketAddress, kind: CheckKind, now: Int64) {
        self.address = address
        self.kind = kind
        started = now
        var connected = false
        do {
            socket = try Sockets.connect(to: address, connected: &connected)
            connectedAtOnce = connected
        } catch {
            socket = .none
            failure = "connect: \(error)"
        }
    }

    private var failure: String?
    /// The connect finished inside `connect(2)` itself (no writable event will be needed).
    private var connectedAtOnce = false

    deinit {
        socket.close()
    }

    func closeSocket() {
        socket.close()
    }

    /// Moves the check on after a readiness event (`events`: the epoll flags seen, 0 right after
    /// init, when nothing has been reported yet).
    func advance(now: Int64, events: UInt32) -> Next {
        if let failure { return finish(false, failure, now: now) }
        switch stage {
        case .connecting:
            let reported = events & (Epoll.writable | Epoll.error | Epoll.hangup)
            if !connectedAtOnce && reported == 0 { return .wait(readable: false) }
            let error = Sockets.pendingError(socket.raw)
            if error == EINPROGRESS || error == EALREADY { return .wait(readable: false) }
            guard error == 0 else {
                return finish(false, "connect: \(String(cString: strerror(error)))", now: now)
            }
            if !connectedAtOnce && events & Epoll.writable == 0 {
                return finish(false, "connect: connection closed", now: now)
            }
            if let tlsCheck = kind.tls {
                do {
                    tls = try TLSClient(fd: socket.raw, check: tlsCheck)
                } catch {
                    return finish(false, error.text, now: now)
                }
                stage = .handshaking
                return advance(now: now, events: events)
            }
            return afterConnection(now: now, detail: "TCP connect ok")
        case .handshaking:
            switch tls!.handshake() {
            case .done: return afterConnection(now: now, detail: "TLS handshake ok")
            case .wantRead: return .wait(readable: true)
            case .wantWrite: return .wait(readable: false)
            case .closed: return finish(false, "TLS handshake: connection closed", now: now)
            case .failed(let text): return finish(false, text, now: now)
            }
        case .sending:
            while sent < request.count {
                let step: TLSClient.Step
                if let tls {
                    step = request.withUnsafeBytes { tls.write(UnsafeRawBufferPointer(rebasing: $0[sent...])) }
                } else {
                    step = request.withUnsafeBytes { raw in
                        switch try? Sockets.write(socket.raw, from: raw.baseAddress! + sent, count: raw.count - sent) {
                        case .done(let count)?: .done(count)
                        case .wouldBlock?: .wantWrite
                        case nil: .failed("send: \(String(cString: strerror(errno)))")
                        }
                    }
                }
                switch step {
                case .done(let count): sent += count
                case .wantRead: return .wait(readable: true)
                case .wantWrite: return .wait(readable: false)
                case .closed: return finish(false, "connection closed while sending the request", now: now)
                case .failed(let text): return finish(false, text, now: now)
                }
            }
            stage = .receiving
            return advance(now: now, events: 0)
        case .receiving:
            return receive(now: now)
        }
    }

    private func afterConnection(now: Int64, detail: String) -> Next {
        guard let http = kind.http else { return finish(true, detail, now: now) }
        request = http.request(for: address)
        stage = .sending
        return advance(now: now, events: 0)
    }

    private func receive(now: Int64) -> Next {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let step: TLSClient.Step = buffer.withUnsafeMutableBytes { raw in
                if let tls { return tls.read(into: raw) }
                switch try? Sockets.read(socket.raw, into: raw.baseAddress!, count: raw.count) {
                case .done(0)?: return .closed
                case .done(let count)?: return .done(count)
                case .wouldBlock?: return .wantRead
                case nil: return .failed("read: \(String(cString: strerror(errno)))")
                }
            }
            switch step {
            case .done(let count):
                response += buffer[0..<count]
                if let verdict = statusVerdict(now: now) { return verdict }
                if response.count > Self.responseLimit {
                    return finish(false, "no status line in the first \(Self.responseLimit) bytes", now: now)
                }
            case .wantRead: return .wait(readable: true)
            case .wantWrite: return .wait(readable: false)
            case .closed:
                return statusVerdict(now: now)
                    ?? finish(false, response.isEmpty ? "connection closed without a response" : "truncated status line", now: now)
            case .failed(let text): return finish(false, text, now: now)
            }
        }
    }

    /// Judges the status line once it is complete; nil while it is not.
    private func statusVerdict(now: Int64) -> Next? {
        guard let end = response.firstIndex(of: 0x0A) else { return nil }
        let line = String(decoding: response[..<end], as: UTF8.self)
            .trimmingCharacters(in: "\r")
        let parts = line.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), parts[1].count == 3, let status = Int(parts[1]) else {
            let shown = line.prefix(60).map { $0.isASCII && !$0.isNewline ? String($0) : "?" }.joined()
            return finish(false, "not an HTTP status line: \"\(shown)\"", now: now)
        }
        let expected = kind.http?.expectedStatus ?? 200...399
        return finish(expected.contains(status), "HTTP \(status)", now: now)
    }

    /// The result of a check still running at its timeout, named by the stage it was stuck in
    /// (HAProxy's L4TOUT, L6TOUT, L7TOUT).
    func timedOut(now: Int64, after timeout: Int64) -> CheckResult {
        let stuck = switch stage {
        case .connecting: "connecting"
        case .handshaking: "in the TLS handshake"
        case .sending: "sending the HTTP request"
        case .receiving: "waiting for the HTTP status line"
        }
        return CheckResult(succeeded: false, duration: now - started, detail: "timeout \(stuck) after \(timeout) ms")
    }

    /// The socket stays open: the checker deregisters it from epoll, then closes it.
    private func finish(_ succeeded: Bool, _ detail: String, now: Int64) -> Next {
        return .finished(CheckResult(succeeded: succeeded, duration: now - started, detail: detail))
    }
}

extension String {
    func trimmingCharacters(in character: Character) -> String {
        var slice = self[...]
        while slice.last == character { slice = slice.dropLast() }
        return String(slice)
    }
}
