import ArgumentParser
import BerthSystem
import BerthWhoami
import Glibc

/// `berth whoami`: the demo backend. Answers every HTTP request with `I'm NAME`.
struct WhoamiCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "whoami",
        abstract: "Run the demo backend: an HTTP/1.1 server that answers \"I'm NAME\".",
        discussion: """
            Like the seed's jwilder/whoami: every request (keep-alive and pipelining supported) gets \
            200 with the body "I'm NAME". GET /bytes/N answers N bytes instead. Stops on SIGTERM or SIGINT.
            """)

    static let environment = EnvironmentFlags(command: "whoami", flags: [
        ("--listen", "BERTH_LISTEN"), ("--id", "BERTH_ID"), ("--threads", "BERTH_THREADS"),
    ] + LoggingOptions.environment, switches: [("--accept-proxy", "BERTH_ACCEPT_PROXY")])

    @Option(help: EnvironmentFlags.help("Address to listen on, HOST:PORT.", "BERTH_LISTEN"), transform: AddressArgument.parse)
    var listen: AddressArgument?

    @Option(help: EnvironmentFlags.help("The name to answer with (default: the host name).", "BERTH_ID"))
    var id: String?

    @Option(help: EnvironmentFlags.help("Server threads.", "BERTH_THREADS"))
    var threads: Int = 1

    @Flag(help: EnvironmentFlags.help("Every connection starts with a PROXY protocol header (v1 or v2, from a proxy's --send-proxy); answers add \"From: CLIENT\" with the client it names. A connection without one gets 400.", "BERTH_ACCEPT_PROXY"))
    var acceptProxy = false

    @OptionGroup(title: "Logging")
    var logging: LoggingOptions

    func validate() throws {
        if listen == nil { throw ValidationError("--listen HOST:PORT is required") }
        if threads < 1 || threads > 64 { throw invalid("--threads", "\(threads)", "a number from 1 to 64") }
        if let id, id.isEmpty || id.contains(where: { $0 == "\r" || $0 == "\n" }) {
            throw invalid("--id", id, "a non-empty name on one line")
        }
    }

    func run() throws {
        guard let listen else { throw ValidationError("--listen HOST:PORT is required") }
        ProcessSignals.block([SIGTERM, SIGINT])
        let identity = id ?? hostName()
        let server = try WhoamiServer(listen: listen.address, identity: identity, threads: threads, acceptProxy: acceptProxy)
        log("whoami '\(identity)' listening on \(server.address)")
        _ = ProcessSignals.wait(for: [SIGTERM, SIGINT])
        server.stop()
        log("whoami stopped after \(server.requestsAnswered) request(s)")
    }

    private func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count) == 0 else { return "berth" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
