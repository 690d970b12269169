/// The registrar's store on BerthEtcd's client. Replaced by the adapter once the client lands.
public struct EtcdRegistrationStore: RegistrationStore {
    public let endpoints: [String]

    public init(endpoints: [String]) throws {
        self.endpoints = endpoints
        throw Unavailable()
    }

    struct Unavailable: Error, CustomStringConvertible {
        var description: String { "the etcd client is not built yet" }
    }

    public func grantLease(ttl: Int64) async throws -> Int64 { throw Unavailable() }
    public func keepAliveOnce(lease: Int64) async throws -> Int64 { throw Unavailable() }
    public func revokeLease(_ lease: Int64) async throws { throw Unavailable() }
    public func put(key: String, value: String, lease: Int64) async throws { throw Unavailable() }
    public func delete(key: String) async throws { throw Unavailable() }
    public func get(prefix: String) async throws -> [String: String] { throw Unavailable() }
}
