// Socket-side fixtures of BerthCLITests: blocking test sockets with timeouts and byte patterns
// (BackendFixtures.swift has the whoami HTTP exchange and the in-test backend).
import BerthSystem
import CBerthShims
import Foundation
import Glibc
import Synchronization
import XCTest

// MARK: - Test sockets

/// Blocking, close-on-exec TCP sockets for the test side, with send and receive timeouts so that
/// no call blocks for longer than asked.
enum TestSocket {
    /// How a read of "everything until the end" ended.
    enum Ending: Equatable { case closed, reset, timedOut, limitReached }

    static func setTimeouts(_ fd: CInt, seconds: Double) {
        var value = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// A `sockaddr` for a numeric host, lent to `body`.
    static func withAddress<R>(_ host: String, _ port: UInt16, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        if host.contains(":") {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            _ = inet_pton(AF_INET6, host, &address.sin6_addr)
            return withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        _ = inet_pton(AF_INET, host, &address.sin_addr)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }

    static func makeSocket(_ host: String) -> CInt {
        Glibc.socket(host.contains(":") ? AF_INET6 : AF_INET, CInt(SOCK_STREAM.rawValue) | CBERTH_SOCK_CLOEXEC, 0)
    }

    /// Connects (blocking, bounded by `timeout`); the errno on failure.
    static func connect(_ port: UInt16, host: String = "127.0.0.1", timeout: Double = 5) -> Result<CInt, SocketFailure> {
        let fd = makeSocket(host)
        guard fd >= 0 else { return .failure(SocketFailure(errno: errno)) }
        setTimeouts(fd, seconds: timeout)
        let result = withAddress(host, port) { Glibc.connect(fd, $0, $1) }
        if result != 0 {
            let code = errno
            Glibc.close(fd)
            return .failure(SocketFailure(errno: code))
        }
        return .success(fd)
    }

    /// A listening socket on `host`, port 0; returns fd and the port the kernel chose.
    static func listen(_ host: String = "127.0.0.1", backlog: CInt = 4096) throws -> (CInt, UInt16) {
        let fd = makeSocket(host)
        guard fd >= 0 else { throw FixtureError("socket: errno \(errno)") }
        var one: CInt = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<CInt>.size))
        guard withAddress(host, 0, { Glibc.bind(fd, $0, $1) }) == 0, Glibc.listen(fd, backlog) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw FixtureError("bind/listen on \(host):0: \(String(cString: strerror(code)))")
        }
        return (fd, localPort(fd))
    }

    static func localPort(_ fd: CInt) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return withUnsafeBytes(of: storage) { raw in
            // sin_port and sin6_port are both at offset 2.
            UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
        }
    }

    /// A port that was free a moment ago (bind to port 0, read it, close).
    static func freePort(_ host: String = "127.0.0.1") throws -> UInt16 {
        let (fd, port) = try listen(host, backlog: 1)
        Glibc.close(fd)
        return port
    }

    static func ipv6LoopbackAvailable() -> Bool {
        guard let (fd, _) = try? listen("::1", backlog: 1) else { return false }
        Glibc.close(fd)
        return true
    }

    /// Sends all of `bytes` (bounded by the socket's send timeout); false on error or timeout.
    @discardableResult
    static func sendAll(_ fd: CInt, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let sent = Glibc.send(fd, raw.baseAddress! + offset, raw.count - offset, CInt(MSG_NOSIGNAL))
                if sent < 0 && errno == EINTR { continue }
                guard sent > 0 else { return false }
                offset += sent
            }
            return true
        }
    }

    @discardableResult
    static func sendAll(_ fd: CInt, _ text: String) -> Bool { sendAll(fd, Array(text.utf8)) }

    /// One recv into `buffer`: > 0 bytes, 0 at EOF, -errno on error (-EAGAIN on timeout).
    static func receive(_ fd: CInt, _ buffer: UnsafeMutableRawBufferPointer, flags: CInt = 0) -> Int {
        while true {
            let count = Glibc.recv(fd, buffer.baseAddress, buffer.count, flags)
            if count >= 0 { return count }
            if errno == EINTR { continue }
            return -Int(errno)
        }
    }

    /// Reads until EOF, reset, `limit` bytes, `timeout` seconds, or `consume` (which sees every
    /// chunk) returns false (then the ending is `.limitReached`).
    @discardableResult
    static func drain(_ fd: CInt, limit: Int = .max, timeout: Double,
                      consume: (UnsafeRawBufferPointer) -> Bool = { _ in true }) -> (bytes: Int, ending: Ending) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
        defer { buffer.deallocate() }
        let deadline = now() + timeout
        var total = 0
        while total < limit {
            let remaining = deadline - now()
            guard remaining > 0 else { return (total, .timedOut) }
            setTimeouts(fd, seconds: min(remaining, 1))
            let count = receive(fd, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<min(buffer.count, limit - total)]))
            if count == 0 { return (total, .closed) }
            if count == -Int(EAGAIN) { continue }
            if count < 0 { return (total, .reset) }
            total += count
            guard consume(UnsafeRawBufferPointer(rebasing: buffer[0..<count])) else { break }
        }
        return (total, .limitReached)
    }

    /// Waits for the peer to close: `.closed`/`.reset`, or `.timedOut`, or `.limitReached` if
    /// bytes arrived instead.
    static func waitForClose(_ fd: CInt, timeout: Double) -> Ending {
        drain(fd, limit: 1, timeout: timeout).ending
    }

    /// Closes with an RST instead of a FIN (SO_LINGER 0).
    static func closeWithReset(_ fd: CInt) {
        var option = linger(l_onoff: 1, l_linger: 0)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &option, socklen_t(MemoryLayout<linger>.size))
        Glibc.close(fd)
    }
}

/// Bytes of the test stream: byte i of a stream is `i % 251`, so a lost, repeated or reordered
/// chunk shows up. `check` compares a chunk at a stream offset with one memcmp.
enum StreamPattern {
    static let period = 251
    static let table: [UInt8] = (0..<(period * 1100)).map { UInt8($0 % period) }

    static func check(_ chunk: UnsafeRawBufferPointer, at offset: Int) -> Bool {
        var position = 0
        while position < chunk.count {
            let length = min(chunk.count - position, table.count - period)
            let same = table.withUnsafeBytes { memcmp(chunk.baseAddress! + position, $0.baseAddress! + (offset + position) % period, length) == 0 }
            guard same else { return false }
            position += length
        }
        return true
    }

    /// Reads a pattern stream until EOF, reset, `limit` bytes or `timeout`, checking every byte;
    /// `progress` sees the running total.
    static func receive(_ fd: CInt, limit: Int = .max, timeout: Double,
                        progress: (Int) -> Void = { _ in }) -> (bytes: Int, ending: TestSocket.Ending, intact: Bool) {
        var offset = 0
        var intact = true
        let (bytes, ending) = TestSocket.drain(fd, limit: limit, timeout: timeout) { chunk in
            intact = intact && check(chunk, at: offset)
            offset += chunk.count
            progress(offset)
            return true
        }
        return (bytes, ending, intact)
    }
}
