import ArgumentParser
import BerthSystem
import Logging
import Glibc

/// The one executable: argument parsing and wiring only.
struct Berth: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "berth",
        abstract: "Service discovery and TCP load balancing for Docker hosts, in one process.",
        discussion: "Every flag can also be set through the environment variable named in its help.",
        version: berthVersion,
        subcommands: [RunCommand.self, ProxyCommand.self, DiscoverCommand.self, RegisterCommand.self, DevCommand.self, CtlCommand.self, WhoamiCommand.self])
}

let berthVersion = "0.1.0"

@main
enum Main {
    static func main() {
        Log.bootstrap()
        var arguments = Array(CommandLine.arguments.dropFirst())
        let environment = currentEnvironment()
        switch arguments.first {
        case "proxy": arguments = ProxyCommand.environment.apply(to: arguments, environment: environment)
        case "discover": arguments = DiscoverCommand.environment.apply(to: arguments, environment: environment)
        case "whoami": arguments = WhoamiCommand.environment.apply(to: arguments, environment: environment)
        case "run": arguments = RunCommand.environment.apply(to: arguments, environment: environment)
        case "register": arguments = RegisterCommand.environment.apply(to: arguments, environment: environment)
        case "ctl": arguments = CtlCommand.environment.apply(to: arguments, environment: environment)
        case "dev": arguments = DevCommand.environment.apply(to: arguments, environment: environment)
        default: break
        }
        do {
            var command = try Berth.parseAsRoot(arguments)
            try command.run()
            exit(0)
        } catch {
            let code = Berth.exitCode(for: error)
            if code == .success {
                // --help, --version: ArgumentParser prints them in full.
                Berth.exit(withError: error)
            }
            let message = Berth.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            log(message, level: .error)
            // Usage errors are EX_USAGE (64); a runtime failure (cannot listen, ...) is 1.
            exit(code == .validationFailure || isUsageError(error) ? 64 : 1)
        }
    }

    private static func isUsageError(_ error: Error) -> Bool {
        error is ValidationError || "\(type(of: error))".contains("CommandError") || "\(type(of: error))".contains("ParserError")
    }

    private static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let text = String(cString: entry)
            if let equals = text.firstIndex(of: "=") {
                result[String(text[..<equals])] = String(text[text.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }
}
