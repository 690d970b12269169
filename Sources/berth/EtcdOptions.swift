import ArgumentParser
import BerthEtcd

/// The flags that say where etcd is, shared by `discover`, `register`, `run` and `dev`.
struct EtcdOptions: ParsableArguments {
    /// Later variables win over earlier ones: the seed's `ETCD_HOST`, then `ETCD_ENDPOINTS`, then ours.
    static let environment: [(flag: String, variable: String)] = [
        ("--etcd", "ETCD_HOST"), ("--etcd", "ETCD_ENDPOINTS"), ("--etcd", "BERTH_ETCD"),
        ("--prefix", "BERTH_PREFIX"), ("--etcd-user", "ETCD_USERNAME"), ("--etcd-password", "ETCD_PASSWORD"),
        ("--etcd-ca", "BERTH_ETCD_CA"), ("--etcd-cert", "BERTH_ETCD_CERT"), ("--etcd-key", "BERTH_ETCD_KEY"),
        ("--etcd-timeout", "BERTH_ETCD_TIMEOUT"),
    ]

    @Option(help: EnvironmentFlags.help("etcd endpoints in failover order: http://a:2379,https://b:2379, or host:port as the seed's ETCD_HOST (also env ETCD_HOST, ETCD_ENDPOINTS).", "BERTH_ETCD"))
    var etcd: String = "http://127.0.0.1:2379"

    @Option(help: EnvironmentFlags.help("Key prefix of the registry: <prefix>/<service>/<instance>.", "BERTH_PREFIX"))
    var prefix: String = "/backends"

    @Option(help: EnvironmentFlags.help("etcd username, when etcd has auth enabled.", "ETCD_USERNAME"))
    var etcdUser: String?

    @Option(help: EnvironmentFlags.help("etcd password (with --etcd-user).", "ETCD_PASSWORD"))
    var etcdPassword: String?

    @Option(help: EnvironmentFlags.help("CA file (PEM) that signs the etcd servers' certificates, for https endpoints.", "BERTH_ETCD_CA"))
    var etcdCa: String?

    @Option(help: EnvironmentFlags.help("Client certificate (PEM) for etcd's client-cert-auth.", "BERTH_ETCD_CERT"))
    var etcdCert: String?

    @Option(help: EnvironmentFlags.help("Key (PEM) of --etcd-cert.", "BERTH_ETCD_KEY"))
    var etcdKey: String?

    @Option(help: EnvironmentFlags.help("Time limit of one etcd request on one endpoint.", "BERTH_ETCD_TIMEOUT"), transform: DurationArgument.parse)
    var etcdTimeout = DurationArgument(milliseconds: 5_000)

    func validate() throws {
        do {
            _ = try EtcdEndpoint.parseList(etcd)
        } catch {
            throw ValidationError("--etcd: \(error)")
        }
        if (etcdUser == nil) != (etcdPassword == nil) {
            throw ValidationError("--etcd-user and --etcd-password go together")
        }
        if (etcdCert == nil) != (etcdKey == nil) {
            throw ValidationError("--etcd-cert and --etcd-key go together")
        }
        guard prefix.hasPrefix("/"), prefix.count > 1 else {
            throw ValidationError("--prefix: '\(prefix)' must start with '/' and name something, as /backends")
        }
    }

    /// The client configuration these flags describe.
    func configuration() throws -> EtcdConfiguration {
        var configuration = EtcdConfiguration(endpoints: try EtcdEndpoint.parseList(etcd))
        if let etcdUser, let etcdPassword {
            configuration.credentials = .init(username: etcdUser, password: etcdPassword)
        }
        if etcdCa != nil || etcdCert != nil {
            configuration.tls = .init(caFile: etcdCa, certificateFile: etcdCert, keyFile: etcdKey)
        }
        configuration.requestTimeout = .milliseconds(etcdTimeout.milliseconds)
        return configuration
    }
}
