// Socket-side fixtures of BerthCLITests, continued: the whoami HTTP exchange and the in-test
// backend (SocketFixtures.swift has the test sockets and byte patterns).
import BerthSystem
import CBerthShims
import Foundation
import Glibc
import Synchronization
import XCTest

// MARK: - HTTP/1.1 client side (for whoami)

struct HTTPResponse {
    var status: Int
    var headers: [String: String]
    var body: [UInt8]
    var text: String { String(decoding: body, as: UTF8.self) }
}

enum HTTPExchange {
    /// Reads until `count` complete responses arrived, the peer closed, or `timeout` passed.
    static func readResponses(_ fd: CInt, count: Int, timeout: Double) -> (responses: [HTTPResponse], ending: TestSocket.Ending) {
        var input: [UInt8] = []
        var responses: [HTTPResponse] = []
        guard count > 0 else { return ([], .limitReached) }
        let (_, ending) = TestSocket.drain(fd, timeout: timeout) { chunk in
            input.append(contentsOf: chunk)
            while let (response, length) = parse(input) {
                responses.append(response)
                input.removeFirst(length)
            }
            return responses.count < count
        }
        return (responses, ending)
    }

    /// One complete response at the start of `bytes`, and its length.
    static func parse(_ bytes: [UInt8]) -> (HTTPResponse, Int)? {
        guard bytes.count >= 4 else { return nil }
        var end = -1
        for index in 3..<bytes.count where bytes[index - 3...index].elementsEqual([13, 10, 13, 10]) {
            end = index + 1
            break
        }
        guard end > 0 else { return nil }
        let lines = String(decoding: bytes[0..<end], as: UTF8.self).split(separator: "\r\n")
        guard let statusLine = lines.first, statusLine.split(separator: " ").count >= 2,
              let status = Int(statusLine.split(separator: " ")[1]) else { return nil }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let length = Int(headers["content-length"] ?? "0") ?? 0
        guard bytes.count >= end + length else { return nil }
        return (HTTPResponse(status: status, headers: headers, body: Array(bytes[end..<end + length])), end + length)
    }

    static func request(_ path: String = "/", version: String = "HTTP/1.1", headers: String = "") -> String {
        "GET \(path) \(version)\r\nHost: test\r\n\(headers)\r\n"
    }

    /// One GET on a new connection; the body, or nil.
    static func get(_ port: UInt16, host: String = "127.0.0.1", path: String = "/", timeout: Double = 5) -> HTTPResponse? {
        guard case .success(let fd) = TestSocket.connect(port, host: host, timeout: timeout) else { return nil }
        defer { Glibc.close(fd) }
        guard TestSocket.sendAll(fd, request(path, headers: "Connection: close\r\n")) else { return nil }
        return readResponses(fd, count: 1, timeout: timeout).responses.first
    }
}

// MARK: - In-test backend

/// A TCP backend inside the test process, on 127.0.0.1 (stopped at teardown).
///
/// `.holding` accepts and keeps every connection (nonblocking fds, no thread per connection):
/// thousands of idle connections. `.scripted` gives each connection a thread that obeys the first
/// line the client sends: `HOLD` (stay open until the client closes), `SEND total chunk pauseMs`
/// (send `total` pattern bytes, 0 for no end, `chunk` at a time with a pause after each, then
/// close), `ECHO` (send everything back, pass the FIN on). Every connection ends after
/// `lifetime` seconds at most.
final class TestBackend: Sendable {
    enum Mode: Sendable { case holding, scripted }

    let mode: Mode
    let port: UInt16
    var address: String { "127.0.0.1:\(port)" }
    private let listener: CInt
    private let stopping = Atomic<Bool>(false)
    /// The acceptor first, then one per scripted connection.
    private let threads = Mutex<[pthread_t]>([])
    /// Open connections: fd → one byte was received from it (holding mode).
    private let connections = Mutex<[CInt: Bool]>([:])
    private let accepted = Atomic<Int>(0)
    static let lifetime = 120.0

    init(_ mode: Mode) throws {
        self.mode = mode
        (listener, port) = try TestSocket.listen()
        _ = fcntl(listener, F_SETFL, fcntl(listener, F_GETFL) | O_NONBLOCK)
        let acceptor = OSThread(name: "test-backend") { [self] in acceptLoop() }
        threads.withLock { $0.append(acceptor.handle) }
    }

    var acceptedCount: Int { accepted.load(ordering: .relaxed) }
    var openCount: Int { connections.withLock { $0.count } }

    private var isStopping: Bool { stopping.load(ordering: .relaxed) }

    private func acceptLoop() {
        while !isStopping {
            var ready = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            guard Glibc.poll(&ready, 1, 50) > 0 else { continue }
            let fd = cberth_accept4(listener, nil, nil)  // nonblocking, close-on-exec
            guard fd >= 0 else {
                if errno == EMFILE || errno == ENFILE { sleep(seconds: 0.01) }
                continue
            }
            accepted.add(1, ordering: .relaxed)
            connections.withLock { $0[fd] = false }
            guard mode == .scripted else { continue }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
            let worker = OSThread(name: "test-connection") { [self] in
                serve(fd)
                connections.withLock { _ = $0.removeValue(forKey: fd) }
                Glibc.close(fd)
            }
            threads.withLock { $0.append(worker.handle) }
        }
    }

    /// Holding mode: reads the byte each client was asked to send; how many have arrived.
    func connectionsWithOneByte() -> Int {
        connections.withLock { connections in
            var byte: UInt8 = 0
            for (fd, seen) in connections where !seen && Glibc.recv(fd, &byte, 1, CInt(MSG_DONTWAIT)) == 1 {
                connections[fd] = true
            }
            return connections.values.count { $0 }
        }
    }

    private func serve(_ fd: CInt) {
        TestSocket.setTimeouts(fd, seconds: 0.2)
        let deadline = now() + Self.lifetime
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 128 && now() < deadline && !isStopping {
            let count = Glibc.recv(fd, &byte, 1, 0)
            if count == 1 {
                if byte == UInt8(ascii: "\n") { break }
                line.append(byte)
            } else if count == 0 || (errno != EAGAIN && errno != EINTR) {
                return
            }
        }
        let words = String(decoding: line, as: UTF8.self).split(separator: " ").map(String.init)
        switch words.first {
        case "HOLD":
            while now() < deadline && !isStopping {
                let count = Glibc.recv(fd, &byte, 1, 0)
                if count == 0 || (count < 0 && errno != EAGAIN && errno != EINTR) { return }
            }
        case "SEND" where words.count == 4:
            send(fd, total: Int(words[1]) ?? 0, chunk: Int(words[2]) ?? 65536, pause: Double(words[3]) ?? 0, deadline: deadline)
        case "ECHO":
            echo(fd, deadline: deadline)
        default:
            return
        }
    }

    private func send(_ fd: CInt, total: Int, chunk: Int, pause: Double, deadline: Double) {
        var offset = 0
        while (total == 0 || offset < total) && now() < deadline && !isStopping {
            let want = min(chunk, StreamPattern.table.count - StreamPattern.period, total == 0 ? .max : total - offset)
            var done = 0
            while done < want {
                let sent = StreamPattern.table.withUnsafeBytes {
                    Glibc.send(fd, $0.baseAddress! + (offset + done) % StreamPattern.period, want - done, CInt(MSG_NOSIGNAL))
                }
                if sent > 0 {
                    done += sent
                } else if errno != EAGAIN && errno != EINTR || now() > deadline || isStopping {
                    return  // the client went away (or the test is over)
                }
            }
            offset += want
            if pause > 0 { sleep(seconds: pause / 1000) }
        }
        Glibc.shutdown(fd, CInt(SHUT_WR))
    }

    private func echo(_ fd: CInt, deadline: Double) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while now() < deadline && !isStopping {
            let count = buffer.withUnsafeMutableBytes { TestSocket.receive(fd, $0) }
            if count == 0 {
                Glibc.shutdown(fd, CInt(SHUT_WR))
                return
            }
            if count == -Int(EAGAIN) { continue }
            guard count > 0, TestSocket.sendAll(fd, Array(buffer[0..<count])) else { return }
        }
    }

    /// Stops accepting, ends every connection and joins every thread. Idempotent.
    func stop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        let acceptor = threads.withLock { $0.first }
        if let acceptor { pthread_join(acceptor, nil) }
        connections.withLock { for fd in $0.keys { Glibc.shutdown(fd, CInt(SHUT_RDWR)) } }
        for thread in threads.withLock({ $0.dropFirst() }) { pthread_join(thread, nil) }
        connections.withLock { connections in
            for fd in connections.keys { Glibc.close(fd) }  // holding mode; scripted ones closed themselves
            connections.removeAll()
        }
        Glibc.close(listener)
    }
}

