import ArgumentParser
import Logging
import Synchronization

/// `--log-level`, on every command that runs a service. Every line Berth writes to stderr goes
/// through swift-log's stream handler, in one format: time, level, label, message.
struct LoggingOptions: ParsableArguments {
    static let environment: [(flag: String, variable: String)] = [("--log-level", "BERTH_LOG_LEVEL")]

    @Option(help: EnvironmentFlags.help("Least severe messages written to stderr: trace, debug, info, notice, warning, error or critical.", "BERTH_LOG_LEVEL"))
    var logLevel: Logger.Level = .info

    /// Parsing is done before any service starts: loggers made from now on use the level.
    func validate() throws {
        Log.level.withLock { $0 = logLevel }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The process's logging set-up.
enum Log {
    /// The level of loggers made from now on (set by `LoggingOptions`).
    static let level = Mutex<Logger.Level>(.info)

    static func bootstrap() {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level.withLock { $0 }
            return handler
        }
    }

    /// The command line's own logger (made at first use, after parsing).
    static let berth = Logger(label: "berth")
}

/// One message from the command line (wiring, start-up, signals), at `level`.
func log(_ message: String, level: Logger.Level = .info) {
    Log.berth.log(level: level, "\(message)")
}
