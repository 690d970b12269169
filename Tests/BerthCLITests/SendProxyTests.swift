import BerthSystem
import BerthTestSupport
import Foundation
import Glibc
import XCTest

/// `--send-proxy v1|v2`: backends behind a real `berth proxy` see the client's address in a
/// PROXY protocol header before its first byte: `berth whoami --accept-proxy` and a real nginx
/// (`listen ... proxy_protocol`, `$proxy_protocol_addr`), clients over IPv4 and IPv6, and a
/// request replayed to a second backend after the first closed without answering.
final class SendProxyTests: BerthTestCase {
    /// The local address of a connected socket (the client as the proxy sees it).
    private func localAddress(_ fd: CInt) throws -> SocketAddress {
        try Sockets.localAddress(fd)
    }

    /// One GET on a new connection from the test to host:port; the body and the client's address.
    private func get(_ port: UInt16, host: String) throws -> (body: String, client: SocketAddress) {
        let fd = try connect(port, host: host)
        let client = try localAddress(fd)
        XCTAssertTrue(TestSocket.sendAll(fd, HTTPExchange.request()))
        let (responses, ending) = HTTPExchange.readResponses(fd, count: 1, timeout: 5)
        guard let response = responses.first else { throw FixtureError("no answer from \(host):\(port) (\(ending))") }
        return (response.text, client)
    }

    func testWhoamiSeesTheClientWithV1AndV2OverIPv4AndIPv6() throws {
        let backend = try startWhoami(id: "pp", options: ["--accept-proxy"])
        for version in ["v1", "v2"] {
            for host in ["127.0.0.1", "::1"] {
                let proxy = try startProxy(backends: [backend.address], options: ["--send-proxy", version], host: host)
                for _ in 0..<2 {
                    let (body, client) = try get(proxy.port, host: host)
                    XCTAssertEqual(body, "I'm pp\nFrom: \(client)\n", "\(version) through \(host)")
                }
            }
        }
        // Without --send-proxy the backend gets no header, and refuses the request.
        let plain = try startProxy(backends: [backend.address])
        XCTAssertEqual(HTTPExchange.get(plain.port)?.status, 400)
    }

    /// The first backend of the rotation closes without answering; retry-on empty-response
    /// replays the request to the second, which must see the header first again.
    func testAReplayedRequestStartsWithTheHeaderAgain() throws {
        let closer = try startBackend(.scripted)  // reads the first line ("PROXY ..."), then closes
        let backend = try startWhoami(id: "second", options: ["--accept-proxy"])
        let proxy = try startProxy(backends: [closer.address, backend.address], options: [
            "--send-proxy", "v1", "--retry-on", "empty-response", "--retries", "1", "--workers", "1",
        ])
        for _ in 0..<4 {
            let (body, client) = try get(proxy.port, host: "127.0.0.1")
            XCTAssertEqual(body, "I'm second\nFrom: \(client)\n")
        }
    }

    func testNginxReadsTheHeader() throws {
        guard access("/usr/sbin/nginx", X_OK) == 0 else { throw XCTSkip("nginx is not installed (scripts/test installs nginx-light)") }
        let nginx = try NginxFixture()
        defer { nginx.stop() }
        for version in ["v1", "v2"] {
            for (listen, backend) in [("127.0.0.1", "127.0.0.1:\(nginx.port)"), ("::1", "[::1]:\(nginx.port)"), ("::1", "127.0.0.1:\(nginx.port)")] {
                let proxy = try startProxy(backends: [backend], options: ["--send-proxy", version], host: listen)
                let (body, client) = try get(proxy.port, host: listen)
                XCTAssertEqual(body, "\(client.host) \(client.port)\n", "\(version), client on \(listen), nginx on \(backend)")
            }
        }
    }
}

/// Debian's nginx as a process of the test: `daemon off`, a temporary prefix, listening with
/// `proxy_protocol` on 127.0.0.1 and [::1], answering `$proxy_protocol_addr $proxy_protocol_port`.
final class NginxFixture {
    let port: Int
    let directory: String
    private let process: SpawnedProcess

    init() throws {
        var template = Array("/tmp/berth-nginx-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { throw FixtureError("mkdtemp: errno \(errno)") }
        directory = String(cString: made)
        port = try freeLoopbackPort()
        let configuration = """
            daemon off;
            master_process off;
            worker_processes 1;
            pid \(directory)/nginx.pid;
            error_log \(directory)/error.log warn;
            events { worker_connections 64; }
            http {
                access_log off;
                client_body_temp_path \(directory)/body;
                proxy_temp_path \(directory)/proxy;
                fastcgi_temp_path \(directory)/fastcgi;
                uwsgi_temp_path \(directory)/uwsgi;
                scgi_temp_path \(directory)/scgi;
                server {
                    listen 127.0.0.1:\(port) proxy_protocol;
                    listen [::1]:\(port) proxy_protocol;
                    location / { default_type text/plain; return 200 "$proxy_protocol_addr $proxy_protocol_port\\n"; }
                }
            }
            """
        try configuration.write(toFile: "\(directory)/nginx.conf", atomically: true, encoding: .utf8)
        process = try SpawnedProcess("/usr/sbin/nginx", ["-p", directory, "-c", "\(directory)/nginx.conf", "-e", "\(directory)/error.log"])
        let listening = waitUntil(timeout: 10, interval: 0.02) { !process.isRunning || HTTPProbe.isListening(port: port) }
        guard listening != nil, process.isRunning else {
            let log = (try? String(contentsOfFile: "\(directory)/error.log", encoding: .utf8)) ?? ""
            process.stop()
            try? FileManager.default.removeItem(atPath: directory)
            throw FixtureError("nginx did not start: \(process.standardError) \(log)")
        }
    }

    func stop() {
        process.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}
