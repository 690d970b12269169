import BerthSystem
import BerthTestSupport
import Glibc

/// The faults of the hosts scenario, one after the other on one set of hosts, with both loads
/// running throughout; each fault's window of samples makes its two rows.
struct HostsRun {
    enum Fault: String, CaseIterable {
        case partition = "partition from backend host a"
        case heal = "the partition heals"
        case hostDies = "backend host a dies (link down)"
        case silent = "a backend accepts, never answers"
        case delay = "200 ms delay on host a"
        case loss = "5% loss on host a"
        case clientCutOff = "client host cut off from etcd"
        case etcdDies = "etcd host dies, comes back"
    }

    let scene: Scene
    let haproxy: HAProxyBed?
    let berthLoad: RequestLoad
    let haproxyLoad: RequestLoad?
    let quick: Bool
    let silentAddress: String

    private var a: [String] { ["a1", "a2"].map { scene.backends[$0]! } }

    func measure(_ fault: Fault) throws -> [HostsRow] {
        switch fault {
        case .partition:
            return try downRows(fault, cut: { try scene.bed.partition("a", from: "client") })
        case .heal:
            let start = monotonicSeconds()
            try scene.bed.heal("a", from: "client")
            return upRows(fault, since: start)
        case .hostDies:
            let start = monotonicSeconds()
            // Watched while the rows are measured: when a's keys leave etcd (its lease expires).
            var keysGone: Double?
            var rows = try downRows(fault, cut: { try scene.bed.setLink("a", up: false) }, watch: {
                guard keysGone == nil, let keys = try? scene.etcd.keys(prefix: Scene.prefix) else { return }
                if a.allSatisfy({ !keys.contains(Scene.prefix + $0) }) { keysGone = monotonicSeconds() - start }
            })
            rows[0].detail += "; its keys left etcd \(keysGone.map { Self.seconds($0) } ?? "not within 10 s") after the link went down (TTL 3 s)"
            try scene.bed.setLink("a", up: true)
            _ = upRows(fault, since: monotonicSeconds())  // settle: a's registrar registers again, both proxies take a back
            return rows
        case .silent:
            let start = monotonicSeconds()
            let host = silentAddress.split(separator: ":")[0], port = silentAddress.split(separator: ":")[1]
            _ = try scene.etcd.etcdctl(["put", Scene.prefix + silentAddress, "{\"host\":\"\(host)\",\"port\":\(port),\"listen\":\(Scene.listenPort)}"])
            _ = try haproxy?.command("enable server whoami/silent")
            sleepSeconds(quick ? 4 : 10)
            _ = try scene.etcd.etcdctl(["del", Scene.prefix + silentAddress])
            _ = try haproxy?.command("disable server whoami/silent")
            let end = monotonicSeconds()
            sleepSeconds(1)
            let detail = "Berth with --retry-on empty-response,response-timeout --first-byte-timeout 1s; HAProxy in TCP mode has no retry on a silent server"
            return rows(fault, from: start, to: end, berthDetail: detail, haproxyDetail: "")
        case .delay:
            let start = monotonicSeconds()
            try scene.bed.delay("a", milliseconds: 200)
            var downBerth = false, downHAProxy = false
            let until = start + (quick ? 4 : 8)
            while monotonicSeconds() < until {
                if let stats = try? scene.stats(), a.contains(where: { stats.backend($0)?.status != "UP" }) { downBerth = true }
                if let statuses = haproxy?.statuses(), ["a1", "a2"].contains(where: { statuses[$0] != "UP" }) { downHAProxy = true }
                sleepSeconds(0.1)
            }
            let end = monotonicSeconds()
            try scene.bed.clearImpairments("a")
            sleepSeconds(1)
            func said(_ down: Bool) -> String { down ? "a backend of a was marked down" : "nothing marked down (check timeout 1 s)" }
            return rows(fault, from: start, to: end, berthDetail: said(downBerth), haproxyDetail: said(downHAProxy))
        case .loss:
            let start = monotonicSeconds()
            try scene.bed.loss("a", percent: 5)
            sleepSeconds(quick ? 5 : 12)
            let end = monotonicSeconds()
            try scene.bed.clearImpairments("a")
            _ = upRows(fault, since: monotonicSeconds())  // settle: checks that lost their SYN come back
            return rows(fault, from: start, to: end, berthDetail: "", haproxyDetail: "")
        case .clientCutOff:
            return try registryRows(fault, cutSeconds: quick ? 12 : 30, change: "put", spare: "b3",
                                    cut: { try scene.bed.partition("client", from: "etcd") },
                                    restore: { try scene.bed.heal("client", from: "etcd") })
        case .etcdDies:
            return try registryRows(fault, cutSeconds: quick ? 6 : 10, change: "del", spare: "b3",
                                    cut: { try scene.bed.setLink("etcd", up: false) },
                                    restore: { try scene.bed.setLink("etcd", up: true) })
        }
    }

    /// Cuts host a off (from the client or altogether), waits until each proxy took a's backends
    /// down, then 5 s more; each row's traffic is what came after its proxy took them down.
    private func downRows(_ fault: Fault, cut: () throws -> Void, watch: () -> Void = {}) throws -> [HostsRow] {
        let start = monotonicSeconds()
        try cut()
        var berthDown: Double?, haproxyDown: Double?
        _ = waitUntil(timeout: 10, interval: 0.02) {
            watch()
            if berthDown == nil, let stats = try? scene.stats(), a.allSatisfy({ stats.backend($0)?.status == "DOWN" }) {
                berthDown = monotonicSeconds() - start
            }
            if haproxyDown == nil, let statuses = haproxy?.statuses(), ["a1", "a2"].allSatisfy({ statuses[$0]?.hasPrefix("DOWN") == true }) {
                haproxyDown = monotonicSeconds() - start
            }
            return berthDown != nil && (haproxy == nil || haproxyDown != nil)
        }
        let end = monotonicSeconds() + (quick ? 2 : 5)
        while monotonicSeconds() < end {
            watch()
            sleepSeconds(0.05)
        }
        func detail(_ down: Double?, _ load: RequestLoad?) -> String {
            guard let down else { return "a's backends NOT marked down within 10 s" }
            let before = load.map { HostsRun.window($0.samples, from: start, to: start + down) } ?? []
            return "a's backends down after \(Self.seconds(down)) (fall x inter + timeout = 2 s); before that \(before.count) "
                + "requests, \(before.filter(\.failed).count) failed, \(before.filter { $0.seconds > 1 }.count) over 1 s; the row counts what came after"
        }
        var rows = self.rows(fault, from: start + (berthDown ?? 0), to: end, haproxyFrom: start + (haproxyDown ?? 0),
                             berthDetail: detail(berthDown, berthLoad), haproxyDetail: detail(haproxyDown, haproxyLoad))
        if berthDown == nil { rows[0].detail = "a's backends NOT marked down within 10 s" }
        return rows
    }

    /// Waits until each proxy has a's backends up and one of them answered again.
    private func upRows(_ fault: Fault, since start: Double) -> [HostsRow] {
        var berthUp: Double?, haproxyUp: Double?
        _ = waitUntil(timeout: 20, interval: 0.02) {
            if berthUp == nil, let stats = try? scene.stats(), a.allSatisfy({ stats.backend($0)?.status == "UP" }) {
                berthUp = monotonicSeconds() - start
            }
            if haproxyUp == nil, let statuses = haproxy?.statuses(), ["a1", "a2"].allSatisfy({ statuses[$0]?.hasPrefix("UP") == true }) {
                haproxyUp = monotonicSeconds() - start
            }
            return berthUp != nil && (haproxy == nil || haproxyUp != nil)
        }
        sleepSeconds(quick ? 1 : 2)
        let end = monotonicSeconds()
        func detail(_ up: Double?, _ load: RequestLoad?) -> String {
            guard let up else { return "a's backends NOT up within 20 s" }
            let answered = load?.samples.first { $0.start >= start + up && ($0.answer == "a1" || $0.answer == "a2") }
            return "up after \(Self.seconds(up)) (rise x inter = 1 s); a answered again \(answered.map { Self.seconds($0.start - start) } ?? "never") after"
        }
        return rows(fault, from: start, to: end, berthDetail: detail(berthUp, berthLoad), haproxyDetail: detail(haproxyUp, haproxyLoad))
    }

    /// Cuts Berth's host from etcd (or etcd's host off), changes the registry 2 s in (`put` or
    /// `del` of the spare's key, from the etcd host itself), restores, and measures how soon the
    /// change is routed and whether the registered backends stayed routed all along.
    private func registryRows(_ fault: Fault, cutSeconds: Double, change: String, spare: String,
                              cut: () throws -> Void, restore: () throws -> Void) throws -> [HostsRow] {
        let address = scene.backends[spare]!
        // The registered backends' state is sampled throughout: during the cut, and after it
        // until the lease expiries etcd made meanwhile (TTL) reached Berth and the 5 s it holds
        // such deletions were over (with 2 s to spare): a registrar late to register again
        // would show there.
        var fewest = 4
        func sample() -> Bool {
            guard let stats = try? scene.stats() else { return false }
            fewest = min(fewest, ["a1", "a2", "b1", "b2"].filter { stats.backend(scene.backends[$0]!)?.status == "UP" }.count)
            let routed = stats.backend(address) != nil
            return change == "put" ? routed : !routed
        }
        func watch(until deadline: Double) {
            while monotonicSeconds() < deadline {
                _ = sample()
                sleepSeconds(0.1)
            }
        }
        let start = monotonicSeconds()
        try cut()
        watch(until: start + 2)
        if change == "put" { try scene.putInstance(spare) } else { try scene.deleteInstance(spare) }
        watch(until: start + cutSeconds)
        try restore()
        let healed = monotonicSeconds()
        let applied = waitUntil(timeout: 20, interval: 0.02) { sample() }
        let after = Scene.ttl + 5 + 2
        watch(until: healed + after)
        let end = monotonicSeconds()
        let what = change == "put" ? "an instance put" : "an instance deleted"
        let berthDetail = "cut \(Int(cutSeconds)) s; \(what) meanwhile was routed \(applied.map { Self.seconds($0) } ?? "NOT within 20 s") "
            + "after the cut healed; registered backends UP during the cut and \(Int(after)) s after: "
            + (fewest == 4 ? "all 4" : "as few as \(fewest) of 4")
        return rows(fault, from: start, to: end, berthDetail: berthDetail, haproxyDetail: "static configuration: no registry")
    }

    private func rows(_ fault: Fault, from start: Double, to end: Double, haproxyFrom: Double? = nil,
                      berthDetail: String, haproxyDetail: String) -> [HostsRow] {
        // A request still in flight at `end` (one stuck on a silent server, say) is recorded
        // when it ends: wait for it, up to the client's 5 s limit.
        for load in [berthLoad] + (haproxyLoad.map { [$0] } ?? []) {
            _ = waitUntil(timeout: 6, interval: 0.02) { (load.samples.last?.start ?? end) >= end }
        }
        var rows = [Self.row(fault, "berth", Self.window(berthLoad.samples, from: start, to: end), berthDetail)]
        if let haproxyLoad {
            rows.append(Self.row(fault, "haproxy", Self.window(haproxyLoad.samples, from: haproxyFrom ?? start, to: end), haproxyDetail))
        }
        return rows
    }

    static func window(_ samples: [Sample], from start: Double, to end: Double) -> [Sample] {
        samples.filter { $0.start >= start && $0.start < end }
    }

    static func row(_ fault: Fault, _ proxy: String, _ samples: [Sample], _ detail: String) -> HostsRow {
        let summary = LoadSummary(samples)
        return HostsRow(fault: fault.rawValue, proxy: proxy, requests: summary.count, failed: summary.failed.count,
                        slow: samples.filter { $0.seconds > 1 || $0.failed }.count,
                        p50: summary.p50 * 1000, p99: summary.p99 * 1000, maximum: summary.maximum * 1000, detail: detail)
    }

    static func seconds(_ value: Double) -> String {
        value < 1 ? "\(Int((value * 1000).rounded())) ms" : "\(Double(Int(value * 100)) / 100) s"
    }
}
