import BerthSystem
import BerthHealth
import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// A scripted TCP server on 127.0.0.1 for check targets: `reply` gets what the server read so far
/// and returns bytes to send (nil: keep reading; `hang` keeps the connection open silently).
final class ScriptedServer: @unchecked Sendable {
    enum Reply {
        case send([UInt8], thenClose: Bool)
        case hang
    }

    let address: SocketAddress
    private let listener: CInt
    private let lock = NSLock()
    private var stopped = false
    private var thread: Thread?
    private var open: [CInt] = []

    init(reply: @escaping @Sendable () -> Reply) throws {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        address = try Sockets.localAddress(socket.raw)
        listener = socket.release()
        let thread = Thread { [self] in
            while !isStopped {
                var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, 50) > 0 else { continue }
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { continue }
                lock.lock(); open.append(fd); lock.unlock()
                Thread.detachNewThread {
                    var buffer = [UInt8](repeating: 0, count: 4096)
                    _ = recv(fd, &buffer, buffer.count, 0)  // the request (or nothing, for tcp/tls)
                    switch reply() {
                    case .send(let bytes, let thenClose):
                        var offset = 0
                        while offset < bytes.count {
                            let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, CInt(MSG_NOSIGNAL)) }
                            if sent <= 0 { break }
                            offset += sent
                        }
                        if thenClose { shutdown(fd, CInt(SHUT_RDWR)) }
                    case .hang:
                        break
                    }
                }
            }
        }
        self.thread = thread
        thread.start()
    }

    private var isStopped: Bool {
        lock.lock(); defer { lock.unlock() }; return stopped
    }

    func stop() {
        lock.lock(); stopped = true; let fds = open; open = []; lock.unlock()
        while thread?.isFinished == false { usleep(10_000) }
        for fd in fds { close(fd) }
        close(listener)
    }
}

/// Waits (bounded) for `condition`; returns the seconds it took, or nil on timeout.
func waitFor(timeout: Double, _ condition: () -> Bool) -> Double? {
    let start = Date()
    while Date().timeIntervalSince(start) < timeout {
        if condition() { return Date().timeIntervalSince(start) }
        usleep(5_000)
    }
    return nil
}


/// A `berth whoami` child process on a fixed port, stopped by PID.
final class WhoamiProcess {
    let process = Process()
    let address: SocketAddress

    init(port: UInt16, identity: String) throws {
        address = try SocketAddress(parsing: "127.0.0.1:\(port)")
        process.executableURL = URL(fileURLWithPath: BerthBinary.path)
        process.arguments = ["whoami", "--listen", address.description, "--id", identity]
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Ready when it accepts.
        _ = waitFor(timeout: 5) {
            guard let fd = try? connectLoopback(port: port) else { return false }
            close(fd)
            return true
        }
    }

    func kill(_ signal: CInt = SIGKILL) {
        Glibc.kill(process.processIdentifier, signal)
        process.waitUntilExit()
    }
}

/// A free port on 127.0.0.1 (bound and released).
func freePort() throws -> UInt16 {
    var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
    defer { socket.close() }
    return try Sockets.localAddress(socket.raw).port
}

/// A blocking TCP connection to 127.0.0.1:`port`.
func connectLoopback(port: UInt16) throws -> CInt {
    let fd = socket(AF_INET, CInt(SOCK_STREAM.rawValue), 0)
    var sin = sockaddr_in()
    sin.sin_family = sa_family_t(AF_INET)
    sin.sin_port = port.bigEndian
    sin.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    let connected = withUnsafePointer(to: &sin) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else {
        let code = errno
        close(fd)
        throw HealthTestError("connect 127.0.0.1:\(port): errno \(code)")
    }
    return fd
}

/// One HTTP GET with `Connection: close` through `address`; returns the body, throws on any failure.
func fetch(_ address: SocketAddress, timeout: Double = 5) throws -> String {
    let fd = try connectLoopback(port: address.port)
    defer { close(fd) }
    var time = timeval(tv_sec: Int(timeout), tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
    let request = Array("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".utf8)
    guard send(fd, request, request.count, CInt(MSG_NOSIGNAL)) == request.count else { throw HealthTestError("send") }
    var response: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let count = recv(fd, &buffer, buffer.count, 0)
        if count == 0 { break }
        if count < 0 { throw HealthTestError("recv: errno \(errno)") }
        response += buffer[0..<count]
    }
    let text = String(decoding: response, as: UTF8.self)
    guard text.hasPrefix("HTTP/1.1 200"), let split = text.range(of: "\r\n\r\n") else {
        throw HealthTestError("bad response: \(text.prefix(40).debugDescription)")
    }
    return String(text[split.upperBound...])
}

struct HealthTestError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

import BerthWhoami

/// An in-process whoami server for tests that need a healthy backend.
struct WhoamiServerHandle {
    let server: WhoamiServer
    var address: SocketAddress { server.address }

    init(identity: String) throws {
        server = try WhoamiServer(listen: try SocketAddress(parsing: "127.0.0.1:0"), identity: identity)
    }

    func stop() { server.stop() }
}
