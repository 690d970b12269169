// The container image, on a real dockerd and a real etcd: `scripts/image --debug` packs
// the debug `berth` with its shared libraries into a FROM scratch image, which is then run as the
// seed ran its containers (`--net host`, the Docker socket mounted, ETCD_HOST and HOST_IP): a
// whoami container is registered, answers through the container's proxy on loopback, and
// `docker stop` of the Berth container takes its keys away (lease revoked on SIGTERM).
import BerthTestSupport
import Foundation
import Glibc
import XCTest

final class ImageTests: XCTestCase {
    static let fixtures = DockerAndEtcd()
    static let image = "berth-test/berth:dev"

    override class func setUp() {
        super.setUp()
        fixtures.start()
    }

    override class func tearDown() {
        fixtures.stop()
        super.tearDown()
    }

    override func tearDown() {
        guard let docker = Self.fixtures.docker else { return }
        if let ids = try? docker.docker(["ps", "-aq"]).output.split(separator: "\n").map(String.init), !ids.isEmpty {
            _ = try? docker.docker(["rm", "-f"] + ids)
        }
        _ = try? docker.docker(["rmi", "-f", Self.image])
    }

    /// The repository's root (this file is Tests/BerthRegistrarTests/ImageTests.swift).
    var repository: String {
        var root = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { root.deleteLastPathComponent() }
        return root.path
    }

    func testImageRunsAsTheSeedRanItsContainers() throws {
        let (docker, etcd) = try Self.fixtures.require()
        let started = monotonicSeconds()

        // The image, built against the fixture's dockerd.
        // BERTH_IMAGE_BINARY packs that binary instead (the release build scripts/image makes).
        let binary = ProcessInfo.processInfo.environment["BERTH_IMAGE_BINARY"]
        let built = try SpawnedProcess.run("\(repository)/scripts/image", (binary.map { ["--binary", $0] } ?? ["--debug"]) + ["--tag", Self.image],
                                           environment: ["DOCKER_HOST": docker.host], timeout: 300)
        XCTAssertEqual(built.code, 0, "scripts/image: \(built.output) \(built.error)")
        guard built.code == 0 else { return }
        let tookToBuild = monotonicSeconds() - started
        let inspected = try docker.docker(["image", "inspect", "--format", "{{.Size}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}", Self.image])
        XCTAssertEqual(inspected.code, 0, inspected.error)
        let fields = inspected.output.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "|").map(String.init)
        let size = fields.first.flatMap { Int($0) } ?? -1
        XCTAssertEqual(fields.dropFirst().first, #"["/usr/local/bin/berth"]"#)
        XCTAssertEqual(fields.dropFirst(2).first, #"["run"]"#)
        // Debug binary and the toolchain's Swift runtime (Foundation's ICU data alone is ~30 MB);
        // the release image is smaller (README, "The container").
        XCTAssertGreaterThan(size, 1_000_000)
        XCTAssertLessThan(size, 400_000_000, "image of \(size) bytes")

        // A backend on a free port, so that the proxy's listener (its listen port) is free too.
        let listen = try freeLoopbackPort()
        let script = "echo \"I'm $(hostname)\" > /www/index.html; exec httpd -f -p \(listen) -h /www"
        let backendRun = try docker.docker(["run", "-d", "-p", "127.0.0.1:0:\(listen)", "--label", "berth.service=whoami",
                                            DockerFixture.image, "/bin/sh", "-c", script])
        let backend = backendRun.output.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(backend.count, 64, backendRun.error)
        guard backend.count == 64 else { return }
        let key = "/backends/whoami/\(backend.prefix(12))"

        // The Berth container, exactly as the seed ran docker-register and docker-discover.
        let socket = String(docker.host.dropFirst("unix://".count))
        let berthRun = try docker.docker([
            "run", "-d", "--net", "host", "-v", "\(socket):/var/run/docker.sock",
            "-e", "ETCD_HOST=127.0.0.1:\(etcd.members[0].clientPort)", "-e", "HOST_IP=127.0.0.1",
            Self.image, "run", "--bind", "127.0.0.1",
        ])
        let berth = berthRun.output.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(berth.count, 64, berthRun.error)
        guard berth.count == 64 else { return }
        let state = { (try? docker.docker(["inspect", "--format", "{{.State.Status}} exit {{.State.ExitCode}}", berth]).output) ?? "" }
        let logs = { state() + ": " + ((try? docker.docker(["logs", berth])).map { $0.output + $0.error } ?? "") }
        let keys = { try etcd.etcdctl(["get", "--prefix", "/backends"]) }

        let registered = waitUntil(timeout: 10, interval: 0.05) { (try? keys())?.contains(key) == true }
        XCTAssertNotNil(registered, "\(key) not in etcd: \((try? keys()) ?? "") \(logs())")
        let stored = (try? keys()) ?? ""
        XCTAssertTrue(stored.contains("\(try docker.publishedPort(backend, listen))"), "published port not in \(stored)")

        // Through the container's proxy on 127.0.0.1:<listen>: the whoami container answers.
        var answer = ""
        let routed = waitUntil(timeout: 10, interval: 0.05) {
            answer = (try? HTTPProbe.get(port: listen, timeout: 2)) ?? ""
            return !answer.isEmpty
        }
        XCTAssertNotNil(routed, "no answer on 127.0.0.1:\(listen): \(logs())")
        XCTAssertEqual(answer.trimmingCharacters(in: .whitespacesAndNewlines), "I'm \(backend.prefix(12))")

        // docker stop: SIGTERM to berth (PID 1), which revokes its lease: the key goes.
        XCTAssertTrue(state().hasPrefix("running"), "the Berth container is not running before docker stop: \(logs())")
        let stopping = monotonicSeconds()
        XCTAssertEqual(try docker.docker(["stop", "-t", "10", berth], timeout: 30).code, 0)
        let tookToStop = monotonicSeconds() - stopping
        let gone = waitUntil(timeout: 3, interval: 0.05) { (try? keys())?.contains(key) == false }
        XCTAssertNotNil(gone, "\(key) still in etcd after docker stop: \((try? keys()) ?? "")")
        let exit = try docker.docker(["inspect", "--format", "{{.State.ExitCode}}", berth]).output
        XCTAssertEqual(exit.trimmingCharacters(in: .whitespacesAndNewlines), "0", logs())
        XCTAssertLessThan(tookToStop, 9, "docker stop took \(tookToStop) s: SIGTERM was not handled?")
        print("image: \(Self.image) \(size) bytes, built in \(String(format: "%.1f", tookToBuild)) s; "
              + "key in etcd after \(String(format: "%.2f", registered ?? -1)) s; docker stop took \(String(format: "%.2f", tookToStop)) s")
    }
}
