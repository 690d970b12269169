import BerthEngine
import BerthSystem

/// An operator's override of one backend, as HAProxy's `set server state ready|drain|maint`.
/// Pure value; `HealthRouter.setAdminState` applies it.
public enum AdminState: String, Sendable, Codable, CaseIterable {
    /// No override: health decides (HAProxy's `ready`; the admin API's `enable`).
    case ready
    /// No new connections; open ones run on to their end. Checks go on.
    case drain
    /// No new connections, open ones run on, and its checks pause (maintenance). On `ready` it
    /// comes back as a new backend would (`--new-backend-state`), checked again from scratch.
    case maint
}

public enum AdminError: Error, Equatable, CustomStringConvertible, Sendable {
    /// No such service, or no such backend in it, in the desired table.
    case unknownBackend(BackendKey)
    /// A weight outside 0...256.
    case badWeight(Int)
    case engine(String)

    public var description: String {
        switch self {
        case .unknownBackend(let key): "no backend '\(key.backend)' in service '\(key.frontend)'"
        case .badWeight(let weight): "weight \(weight) is out of range (0 to 256)"
        case .engine(let reason): reason
        }
    }
}
