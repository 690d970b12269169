import BerthEtcd

/// The registrar's store on BerthEtcd's client (failover, reconnect and request timeouts are
/// the client's). `berth run` passes the client it shares with discovery.
public struct EtcdRegistrationStore: RegistrationStore {
    public let client: EtcdClient

    public init(client: EtcdClient) {
        self.client = client
    }

    /// A client of its own for `endpoints` (`HOST:PORT` or `http://HOST:PORT`).
    public init(endpoints: [String]) throws {
        let parsed = try EtcdEndpoint.parseList(endpoints.joined(separator: ","))
        client = try EtcdClient(configuration: EtcdConfiguration(endpoints: parsed))
    }

    public func grantLease(ttl: Int64) async throws -> Int64 { try await client.grantLease(ttl: ttl) }
    public func keepAliveOnce(lease: Int64) async throws -> Int64 { try await client.keepAliveOnce(lease: lease) }
    public func revokeLease(_ lease: Int64) async throws { try await client.revokeLease(lease) }

    public func put(key: String, value: String, lease: Int64) async throws {
        _ = try await client.put(key: key, value: value, lease: lease)
    }

    public func delete(key: String) async throws {
        _ = try await client.delete(key: key)
    }

    public func get(keys: [String]) async throws -> [String: String] {
        var result: [String: String] = [:]
        for keyValue in try await client.get(keys: keys) { result[keyValue.key] = keyValue.valueText }
        return result
    }

    public func get(prefix: String) async throws -> [String: String] {
        var result: [String: String] = [:]
        for keyValue in try await client.get(prefix: prefix).keyValues { result[keyValue.key] = keyValue.valueText }
        return result
    }
}
