import BerthDiscovery
import BerthEngine
import BerthHealth
import BerthStats
import BerthSystem
import Logging

/// `--state-file` for `discover` and `run`: restores the last table at start when etcd did not
/// answer, and keeps the file following every table the router applies.
struct StateFileSession: Sendable {
    let writer: StateFileWriter
    /// The first table served came from the file (etcd unreachable at start).
    let restored: Bool

    /// Loads the file when `restore` (etcd did not answer) and serves it; then starts the writer
    /// and hooks it to the router. A missing, corrupt or truncated file is reported and not served.
    static func start(path: String, router: HealthRouter, restore: Bool) -> StateFileSession {
        let loaded = restore ? load(path) : nil
        let writer = StateFileWriter(path: path, written: loaded)
        router.onPublish { applied in
            var saved = SavedState(table: applied.desired, health: applied.health, adminStates: applied.adminStates)
            saved.weights = applied.weights
            writer.submit(saved)
        }
        guard let loaded else { return StateFileSession(writer: writer, restored: false) }
        router.seed(health: loaded.health, adminStates: loaded.adminStates, weights: loaded.weights)
        do {
            let result = try router.apply(loaded.table)
            for (service, reason) in result.failures { log("service \(service): cannot listen: \(reason)", level: .error) }
        } catch {
            log("state file \(path): its table was refused: \(error)", level: .error)
            return StateFileSession(writer: writer, restored: false)
        }
        let age = max(0, StateFileStorage.now() - loaded.savedAt)
        let backends = loaded.table.frontends.reduce(0) { $0 + $1.backends.count }
        log("etcd unreachable: serving from the state file \(path) (saved \(age) s ago, revision \(loaded.table.revision), "
            + "\(loaded.table.frontends.count) services, \(backends) backends) until etcd answers", level: .warning)
        return StateFileSession(writer: writer, restored: true)
    }

    /// The file's state, or nil (logged) when it is missing or cannot be used.
    private static func load(_ path: String) -> SavedState? {
        do {
            guard let bytes = try StateFileStorage.read(path) else {
                log("state file \(path) does not exist yet (first start): nothing to serve until etcd answers")
                return nil
            }
            return try StateFile.decode(bytes)
        } catch {
            log("state file \(path) ignored, not served: \(error)", level: .error)
            return nil
        }
    }

    /// Logs once when etcd's first listing replaces the table restored from the file.
    func announceTakeover(by service: DiscoveryService) {
        guard restored else { return }
        Task {
            while !Task.isCancelled && service.status.listings == 0 {
                try? await Task.sleep(for: .milliseconds(100))
            }
            if !Task.isCancelled {
                log("etcd answered: its table (revision \(service.status.appliedRevision)) replaces the state file's")
            }
        }
    }

    /// The stats page's view: where the table comes from, and the writer's counts.
    func describe(into view: inout DiscoveryView, listings: UInt64) {
        view.source = listings > 0 ? "etcd" : (restored ? "state file" : "none")
        view.stateFile = writer.path
        view.stateFileWrites = writer.writes
        view.stateFileFailures = writer.failures
    }

    func stop() {
        writer.stop()
    }
}
