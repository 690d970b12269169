import BerthSystem
import Glibc

/// `--static-file PATH`: static services, one a line in `--static`'s syntax
/// (`NAME=HOST:PORT[@LISTEN]`, see `StaticService`). Blank lines and lines whose first
/// non-space character is `#` are skipped; spaces around an entry are trimmed. Read at start-up
/// and again on SIGHUP (`Registrar.reloadStaticFile()`).
public enum StaticServiceFile {
    /// A larger file is refused (about 30,000 entries).
    public static let sizeLimit = 1 << 20

    /// The file's entries, after checking that none repeats another of the file or one of
    /// `flags` (the `--static` services) with the same service and instance.
    public static func load(path: String, flags: [Registration]) throws(StaticServiceFileError) -> [Registration] {
        let bytes: [UInt8]
        do {
            bytes = try FileContents.read(path, limit: sizeLimit)
        } catch {
            let reason = error.errno == EFBIG ? "larger than \(sizeLimit >> 20) MiB" : "cannot read it: \(error)"
            throw StaticServiceFileError(path: path, line: nil, reason: reason)
        }
        return try parse(String(decoding: bytes, as: UTF8.self), path: path, flags: flags)
    }

    /// `load` without the reading: `text` is the file's content, `path` only names it in errors.
    public static func parse(_ text: String, path: String, flags: [Registration] = []) throws(StaticServiceFileError) -> [Registration] {
        var seen: [ServiceInstance: String] = [:]
        for flag in flags { seen[ServiceInstance(flag)] = "--static \(flag.service)=\(flag.instance)" }
        var entries: [Registration] = []
        // `isNewline` also ends a line at "\r\n", which is one Character.
        for (index, rawLine) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
            let line = index + 1
            let entry = String(rawLine).trimmedSpaces
            if entry.isEmpty || entry.hasPrefix("#") { continue }
            func failure(_ reason: String) -> StaticServiceFileError { StaticServiceFileError(path: path, line: line, reason: reason) }
            if entry.contains("\u{FFFD}") { throw failure("not UTF-8 text") }
            if entry.contains(",") { throw failure("one service a line: '\(entry)' has a comma") }
            let registration: Registration
            do {
                registration = try StaticService(parsing: entry).registration
            } catch {
                throw failure(error.description)
            }
            let identity = ServiceInstance(registration)
            if let first = seen[identity] {
                throw failure("service \(registration.service) instance \(registration.instance) is already registered by \(first)")
            }
            seen[identity] = "line \(line)"
            entries.append(registration)
        }
        return entries
    }

    /// What makes two entries the same key in etcd.
    private struct ServiceInstance: Hashable {
        let service: String
        let instance: String

        init(_ registration: Registration) {
            service = registration.service
            instance = registration.instance
        }
    }
}

/// A `--static-file` that cannot be used: its path, the line at fault (nil: the whole file) and why.
public struct StaticServiceFileError: Error, Sendable, Equatable, CustomStringConvertible {
    public let path: String
    public let line: Int?
    public let reason: String

    /// The line and the reason, without the path: "line 3: invalid static service ...".
    public var detail: String { line.map { "line \($0): \(reason)" } ?? reason }

    public var description: String { "\(path): \(detail)" }
}
