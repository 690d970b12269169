/// The text of `bench --help`.
let benchUsage = """
    usage: bench [--quick] [--json] [--phases LIST] [--scenarios LIST] [--setups LIST] [--seconds N]
                 [--rate N] [--repeat N] [--haproxy PATH] [--berth PATH] [--berth-before PATH]
                 [--fleet-hosts N] [--fleet-services N] [--fleet-relist-jitter MS]
                 [--fleet-modes LIST] [--fleet-logs DIR] [--fleet-network KIND]
                 [--proxy-wrapper COMMAND] [--help]

    Measures Berth against a direct connection and against HAProxy on this machine, all in one
    run: keep-alive requests/s, new connections/s, bulk Gbit/s with 1 and 4 streams, latency
    percentiles at 2,000 and 20,000 req/s and at 80% of each setup's saturation point, requests/s
    and latency percentiles over 1,000 keep-alive connections, and the proxy's CPU time and peak
    RSS. The proxy runs pinned to CPU 0; the load generator and the backends run on CPU 1, except
    for the two-thread setups (berth-default, haproxy-2t), which run on both. Then six scenarios through
    the berth binary: failover (a backend SIGKILLed and restarted under load), checks (throughput
    with and without 1,000 checked backends, and the checks' CPU cost), discovery (berth
    discover on a real etcd, /usr/bin/etcd: put-to-routable latency, the first sync of 1,000
    services x 10 instances and its memory; skipped without etcd), stats-fuzz (throughput
    while the stats port takes bad and oversized requests, against quiet windows) and hosts
    (the failure matrix on hosts in network namespaces: partitions, a dead host, a silent
    backend, delay, loss, etcd cut off; Berth beside HAProxy; needs root, ip and iptables) and
    features (new connections with each opt-in feature on: weights, leastconn, source, slow
    start, PROXY protocol v1 and v2, the connection log; against all off in the same round, and
    against --berth-before's binary). Only when named: fleet (N hosts in network namespaces, each a
    real berth register and berth discover, on one etcd, directly and through etcd grpc-proxy:
    change -> routable on every host under 50 registrar changes a second, etcd's CPU, memory,
    bytes per change and lease keep-alives, the catch-up after an etcd restart, the herd).

      --quick          1 s per phase instead of 5 s
      --json           print the figures as JSON instead of tables (progress still goes to stderr)
      --phases LIST    comma-separated, from: keepalive, connect, bulk1, bulk4, latency,
                       latency-20k, latency-80, keepalive-1000 and the scenarios failover,
                       checks, discovery, stats-fuzz, hosts, features (bulk means bulk1,bulk4;
                       phases the eight phases; scenarios the six scenarios); only what is named runs
                       (default: all)
      --scenarios LIST the same, for scenarios only: failover, checks, discovery, stats-fuzz, hosts,
                       features, fleet (fleet only when named)
                       (with no --phases, no phase runs)
      --setups LIST    comma-separated, from: direct, berth-splice, berth-copy, berth-auto,
                       haproxy, haproxy-splice-auto, berth-default (the berth binary's
                       `proxy` with its defaults: 2 workers, stats server, TCP checks),
                       haproxy-2t (nbthread 2, stats, checks) (berth means its three
                       relay modes; default: all)
      --seconds N      measured seconds per phase (overrides --quick's 1 s)
      --rate N         requests per second of the latency phase (default 2000)
      --repeat N       run every setup N times, interleaved; each figure comes from its least
                       disturbed round (other processes' CPU plus hypervisor steal; default 1)
      --haproxy PATH   the HAProxy binary (default: haproxy in /usr/sbin, /usr/local/sbin or PATH)
      --berth PATH     the berth binary of berth-default and of the scenarios (default: the
                       one beside this bench, built by swift build -c release --product berth)
      --berth-before PATH
                       an older berth binary: the features scenario also runs it with its
                       defaults (the "before" row: what all features off cost before them)
      --fleet-hosts N  the fleet scenario's hosts (default 200; 20 with --quick)
      --fleet-services N
                       the fleet scenario's services of 10 instances (default 1000; 100 with --quick)
      --fleet-relist-jitter MS
                       the fleet hosts' --relist-jitter in ms (default: berth's, 1 s)
      --fleet-modes LIST
                       the fleet's configurations: direct, grpc-proxy (default: both)
      --fleet-logs DIR the fleet hosts' logs, revision logs and etcd's log are copied to DIR/MODE
      --fleet-network KIND
                       namespaces (a network namespace per host on one bridge; the default where
                       it can be built: root, ip, at most 238 hosts) or loopback (a 127.77.x.y
                       address per host)
      --proxy-wrapper COMMAND
                       run Berth's proxy process under COMMAND (split on spaces), e.g.
                       "valgrind --tool=callgrind --callgrind-out-file=/tmp/berth.%p.out";
                       its figures then measure the profiler too
      --help           this text
    """
