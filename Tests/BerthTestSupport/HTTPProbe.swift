// A blocking HTTP/1.1 client for tests: one request per connection, bounded in time.
import Foundation
import Glibc

public enum HTTPProbe {
    /// GET `path` on 127.0.0.1:`port` with `Connection: close`; returns the body.
    /// Throws on refusal, reset, a timeout (`timeout` seconds for each step) or no HTTP answer.
    public static func get(port: Int, host: String = "127.0.0.1", path: String = "/", timeout: Double = 5) throws -> String {
        let request = Array("GET \(path) HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".utf8)
        let text = try exchange(port: port, host: host, request: request, timeout: timeout)
        guard text.hasPrefix("HTTP/1."), let split = text.range(of: "\r\n\r\n") else {
            throw FixtureFailure("no HTTP response from \(host):\(port): \(text.prefix(200).debugDescription)")
        }
        return String(text[split.upperBound...])
    }

    /// Sends `request` as it is on a new connection and returns everything the peer sent until it
    /// closed (at most 16 MiB). The same bounds as `get`.
    public static func exchange(port: Int, host: String = "127.0.0.1", request: [UInt8], timeout: Double = 5) throws -> String {
        let fd = try connect(port: port, host: host, timeout: timeout)
        defer { close(fd) }
        guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else {
            throw FixtureFailure("send to \(host):\(port): errno \(errno)")
        }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 16 * 1024)
        while true {
            let got = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if got == 0 { break }
            if got < 0 {
                if errno == EINTR { continue }
                throw FixtureFailure("recv from \(host):\(port): errno \(errno) after \(response.count) bytes")
            }
            response += buffer[0..<got]
            if response.count > 16 * 1024 * 1024 { break }
        }
        return String(decoding: response, as: UTF8.self)
    }

    /// A blocking IPv4 connection to host:`port` whose sends and receives time out after
    /// `timeout` seconds; the caller closes it.
    public static func connect(port: Int, host: String = "127.0.0.1", timeout: Double = 5) throws -> CInt {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw FixtureFailure("socket: errno \(errno)") }
        var limit = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, host, &address.sin_addr)
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw FixtureFailure("connect to \(host):\(port): errno \(code)")
        }
        return fd
    }

    /// Whether something accepts connections on 127.0.0.1:`port`.
    public static func isListening(port: Int, host: String = "127.0.0.1") -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        inet_pton(AF_INET, host, &address.sin_addr)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }
}
