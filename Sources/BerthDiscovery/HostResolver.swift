import BerthRegistry
import BerthSystem
import Glibc

/// Resolves the host names of instances off the event loops: getaddrinfo runs on this
/// resolver's own thread, never on a data-plane worker or the watch loop. Results are cached
/// and refreshed every `refreshInterval` (failures every `retryInterval`); a result that
/// changes is reported through `onChange`, whose callbacks run on the resolver's thread (keep
/// them short: rebuild the table, or post to the control plane).
///
/// A failed lookup of a name that had resolved keeps its last good address (HAProxy's `hold
/// valid`, Envoy's DNS clusters): a DNS hiccup must not take working backends out of the table.
/// Only an answer with another address replaces it; the failure is retried every
/// `retryInterval` and counted in `heldFailures`.
///
/// Threads: every method may be called from any thread. State is guarded by one condition
/// lock, which is also what the resolver's thread sleeps on; lookups run with it released.
/// Call `stop()` before dropping the resolver: its thread holds it until then.
public final class HostResolver: @unchecked Sendable {
    /// Resolves one name to one address (port ignored), or says why not. Blocking is allowed.
    public typealias Lookup = @Sendable (String) -> Result<SocketAddress, ResolveFailure>

    public struct ResolveFailure: Error, Sendable, Equatable {
        public var reason: String
        public init(reason: String) { self.reason = reason }
    }

    private struct Entry {
        var resolution: HostResolution = .pending
        /// Monotonic ms at which to look it up (again).
        var due: Int64
    }

    public let refreshInterval: Int64
    public let retryInterval: Int64
    private let lookupFunction: Lookup
    // Guarded by `condition`:
    private let condition = ConditionLock()
    private var entries: [String: Entry] = [:]
    private var listeners: [@Sendable (String, HostResolution) -> Void] = []
    private var stopped = false
    private var thread: OSThread?
    private var heldFailures = 0

    /// Failed lookups that kept a name's last good address.
    public var heldFailureCount: Int {
        condition.lock()
        defer { condition.unlock() }
        return heldFailures
    }

    /// Starts the resolver's thread. Times in milliseconds.
    public init(refreshInterval: Int64 = 30_000, retryInterval: Int64 = 5_000, lookup: @escaping Lookup = HostResolver.systemLookup) {
        self.refreshInterval = refreshInterval
        self.retryInterval = retryInterval
        self.lookupFunction = lookup
        let started = OSThread(name: "berth-resolver") { [self] in run() }
        condition.lock()
        thread = started
        condition.unlock()
    }

    /// Adds a callback for every changed result (name, new resolution).
    public func onChange(_ body: @escaping @Sendable (String, HostResolution) -> Void) {
        condition.lock()
        listeners.append(body)
        condition.unlock()
    }

    /// The names to follow from now on (`Catalog.hostNames`): new ones are looked up at once,
    /// the others forgotten.
    public func track(_ names: Set<String>) {
        condition.lock()
        let now = MonotonicClock.milliseconds()
        entries = entries.filter { names.contains($0.key) }
        for name in names where entries[name] == nil { entries[name] = Entry(due: now) }
        condition.signal()
        condition.unlock()
    }

    /// The current result for `name`; an unknown name is followed from now on (`.pending`).
    public func lookup(_ name: String) -> HostResolution {
        condition.lock()
        defer { condition.unlock() }
        if let entry = entries[name] { return entry.resolution }
        entries[name] = Entry(due: MonotonicClock.milliseconds())
        condition.signal()
        return .pending
    }

    /// Stops the thread (a lookup in progress finishes first) and waits for it. Not from an
    /// `onChange` callback (it runs on that thread).
    public func stop() {
        condition.lock()
        stopped = true
        let running = thread
        thread = nil
        condition.signal()
        condition.unlock()
        running?.join()
    }

    private func run() {
        while let name = nextDueName() {
            let result = lookupFunction(name)
            condition.lock()
            let now = MonotonicClock.milliseconds()
            guard var entry = entries[name] else { condition.unlock(); continue }
            let resolution: HostResolution
            let wait: Int64
            switch result {
            case .success(let address): (resolution, wait) = (.resolved(address), refreshInterval)
            case .failure(let failure):
                if case .resolved = entry.resolution {
                    (resolution, wait) = (entry.resolution, retryInterval)
                    heldFailures += 1
                } else {
                    (resolution, wait) = (.failed(failure.reason), retryInterval)
                }
            }
            let changed = entry.resolution != resolution
            entry.resolution = resolution
            entry.due = now + wait
            entries[name] = entry
            let callbacks = changed ? listeners : []
            condition.unlock()
            for callback in callbacks { callback(name, resolution) }
        }
    }

    /// Sleeps until a name is due (or `stop`); nil once stopped.
    private func nextDueName() -> String? {
        condition.lock()
        defer { condition.unlock() }
        while !stopped {
            let now = MonotonicClock.milliseconds()
            var earliest: (name: String, due: Int64)?
            for (name, entry) in entries where earliest == nil || entry.due < earliest!.due {
                earliest = (name, entry.due)
            }
            guard let earliest else {
                condition.wait()
                continue
            }
            if earliest.due <= now {
                // Not picked again while its lookup runs.
                entries[earliest.name]?.due = now + refreshInterval
                return earliest.name
            }
            condition.wait(milliseconds: earliest.due - now)
        }
        return nil
    }

    /// getaddrinfo (any family, stream sockets); the first address it returns.
    public static func systemLookup(_ name: String) -> Result<SocketAddress, ResolveFailure> {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var list: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(name, nil, &hints, &list)
        guard status == 0, let first = list else {
            let reason = status == 0 ? "no address" : String(cString: gai_strerror(status))
            return .failure(ResolveFailure(reason: reason))
        }
        defer { freeaddrinfo(list) }
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let node = cursor {
            if let socketAddress = node.pointee.ai_addr {
                var text = [CChar](repeating: 0, count: Int(NI_MAXHOST))
                let converted = getnameinfo(socketAddress, node.pointee.ai_addrlen, &text, socklen_t(text.count),
                                            nil, 0, NI_NUMERICHOST)
                if converted == 0 {
                    let host = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                    // A scoped IPv6 address (fe80::1%eth0) is left for the next one.
                    if let address = try? SocketAddress(host: host, port: 0) { return .success(address) }
                }
            }
            cursor = node.pointee.ai_next
        }
        return .failure(ResolveFailure(reason: "no usable address"))
    }
}
