import BerthSystem
import Foundation
import Glibc
import XCTest

/// Blocking-socket helpers for data-plane tests: real sockets on 127.0.0.1, every call bounded by
/// a receive/send timeout so a broken engine fails a test instead of hanging it.
enum TestSocket {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    /// Connects (blocking) with send/receive timeouts.
    static func connect(_ address: SocketAddress, timeout: Double = 5) throws -> CInt {
        let fd = socket(address.family, CInt(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "socket: errno \(errno)") }
        setTimeouts(fd, seconds: timeout)
        let parsed = try SocketAddress(parsing: address.description)
        var storage = sockaddr_storage()
        var length: socklen_t = 0
        if parsed.family == AF_INET {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = parsed.port.bigEndian
            inet_pton(AF_INET, parsed.host, &sin.sin_addr)
            withUnsafeBytes(of: sin) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
        } else {
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = parsed.port.bigEndian
            inet_pton(AF_INET6, parsed.host, &sin6.sin6_addr)
            withUnsafeBytes(of: sin6) { raw in withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: raw) } }
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        }
        let result = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, length) }
        }
        if result != 0 {
            let code = errno
            close(fd)
            throw Failure(description: "connect \(address): errno \(code)")
        }
        return fd
    }

    static func setTimeouts(_ fd: CInt, seconds: Double) {
        var time = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &time, socklen_t(MemoryLayout<timeval>.size))
    }

    static func sendAll(_ fd: CInt, _ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + offset, $0.count - offset, CInt(MSG_NOSIGNAL)) }
            if sent < 0 {
                if errno == EINTR { continue }
                throw Failure(description: "send: errno \(errno)")
            }
            offset += sent
        }
    }

    /// Reads until EOF (or throws on timeout/reset).
    static func receiveAll(_ fd: CInt, limit: Int = 1 << 20) throws -> [UInt8] {
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while result.count < limit {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count == 0 { return result }
            if count < 0 {
                if errno == EINTR { continue }
                throw Failure(description: "recv: errno \(errno) after \(result.count) bytes")
            }
            result += buffer[0..<count]
        }
        return result
    }

    /// Reads exactly `count` bytes.
    static func receiveExactly(_ fd: CInt, _ count: Int) throws -> [UInt8] {
        var result: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while result.count < count {
            let want = min(buffer.count, count - result.count)
            let got = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, want, 0) }
            if got == 0 { throw Failure(description: "EOF after \(result.count) of \(count) bytes") }
            if got < 0 {
                if errno == EINTR { continue }
                throw Failure(description: "recv: errno \(errno) after \(result.count) of \(count) bytes")
            }
            result += buffer[0..<got]
        }
        return result
    }

    /// One HTTP request with `Connection: close`; returns the body.
    static func httpGet(_ address: SocketAddress, path: String = "/") throws -> String {
        let fd = try connect(address)
        defer { close(fd) }
        try sendAll(fd, Array("GET \(path) HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".utf8))
        let response = String(decoding: try receiveAll(fd), as: UTF8.self)
        guard let split = response.range(of: "\r\n\r\n") else {
            throw Failure(description: "no HTTP response: \(response.debugDescription)")
        }
        return String(response[split.upperBound...])
    }

    /// A port on 127.0.0.1 that nothing listens on (bound, then closed).
    static func unusedAddress() throws -> SocketAddress {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        let address = try Sockets.localAddress(socket.raw)
        socket.close()
        return address
    }
}

/// A test backend: accepts on 127.0.0.1 and runs `handler` for each connection on its own thread.
/// `stop()` closes the listener and waits for the accept thread.
final class TestBackend: @unchecked Sendable {
    let address: SocketAddress
    private let listener: CInt
    private let lock = NSLock()
    private var stopped = false
    private var acceptThread: Thread?
    private var connections: [CInt] = []
    private(set) var accepted = 0

    init(handler: @escaping @Sendable (CInt) -> Void) throws {
        var socket = try Sockets.listen(on: try SocketAddress(parsing: "127.0.0.1:0"), reusePort: false)
        address = try Sockets.localAddress(socket.raw)
        listener = socket.release()
        // The listener is nonblocking; poll it so that stop() can end the thread.
        let thread = Thread { [self] in
            while true {
                lock.lock()
                let done = stopped
                lock.unlock()
                if done { return }
                var pollFD = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
                guard poll(&pollFD, 1, 50) > 0 else { continue }
                let fd = accept(listener, nil, nil)
                guard fd >= 0 else { continue }
                let flags = fcntl(fd, F_GETFL)
                _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
                TestSocket.setTimeouts(fd, seconds: 20)
                lock.lock()
                accepted += 1
                connections.append(fd)
                lock.unlock()
                Thread.detachNewThread { handler(fd) }
            }
        }
        acceptThread = thread
        thread.start()
    }

    var acceptedCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return accepted
    }

    func stop() {
        lock.lock()
        stopped = true
        lock.unlock()
        while acceptThread?.isFinished == false { usleep(10_000) }
        close(listener)
    }
}

/// Open descriptors of this process (the fd-leak check around data-plane tests).
func openDescriptorCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? -1
}

/// What each open descriptor is (for a leak's failure message).
func openDescriptorTargets() -> [String] {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return names.sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }.map { name in
        "\(name)→\((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)")) ?? "?")"
    }
}

/// Waits (bounded) until `condition` holds.
func eventually(timeout: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// A deterministic byte stream (xorshift) and a running checksum (FNV-1a 64).
struct ByteStream {
    private var state: UInt64

    init(seed: UInt64) {
        state = seed | 1
    }

    mutating func fill(_ buffer: inout [UInt8]) {
        for index in 0..<buffer.count {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            buffer[index] = UInt8(truncatingIfNeeded: state)
        }
    }
}

struct Checksum {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    private(set) var count = 0

    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        var hash = value
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        value = hash
        count += bytes.count
    }
}

/// Sends `total` bytes of stream `seed` to `fd`, returning the checksum of what was sent.
func sendStream(_ fd: CInt, total: Int, seed: UInt64) throws -> Checksum {
    var stream = ByteStream(seed: seed)
    var checksum = Checksum()
    var buffer = [UInt8](repeating: 0, count: 65536)
    var sent = 0
    while sent < total {
        let size = min(buffer.count, total - sent)
        if size < buffer.count { buffer = Array(buffer[0..<size]) }
        stream.fill(&buffer)
        buffer.withUnsafeBytes { checksum.add($0) }
        try TestSocket.sendAll(fd, buffer)
        sent += size
    }
    return checksum
}

/// Reads `fd` to EOF, returning the checksum of what arrived.
func receiveStream(_ fd: CInt) throws -> Checksum {
    var checksum = Checksum()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if count == 0 { return checksum }
        if count < 0 {
            if errno == EINTR { continue }
            throw TestSocket.Failure(description: "recv: errno \(errno) after \(checksum.count) bytes")
        }
        buffer.withUnsafeBytes { checksum.add(UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
    }
}

let loopbackAnyPort = try! SocketAddress(parsing: "127.0.0.1:0")
