// Faults of a NetworkTestBed host: link down, partition, delay, loss. Every fault is a rule in
// the host's own namespace (or its switch-side veth), so undoing it touches nothing else.
//
// Rule order in a host's chains: partition and loss DROP rules are inserted at the top, the
// delay's NFQUEUE rule is appended, so a dropped packet is never queued first. (A packet
// accepted by the queue's verdict leaves the chain; rules after NFQUEUE never see it.)
import Foundation
import Glibc

/// What a host suffers now, so that heal and clearImpairments remove exactly what was added.
struct Impairments {
    var partitions: Set<String> = []
    var lossRules: [[String]] = []
    var delayRule: [String]?
    var delayer: PacketDelayer?
}

extension NetworkTestBed {
    /// The NFQUEUE number of every host's delayer (queues are per namespace).
    static let delayQueue: UInt16 = 7

    /// The host dies (`up: false`) or comes back: its switch-side veth goes down or up. Its
    /// peers get no RST; their packets to it are dropped by the bridge, unanswered.
    public func setLink(_ host: String, up: Bool) throws {
        let port = self.host(host).switchPort
        try ip(["-n", switchNamespace, "link", "set", port, up ? "up" : "down"])
    }

    /// Drops every packet between `host` and `other`, in both directions, silently (iptables
    /// DROP in `host`'s namespace for `other`'s address). Idempotent.
    public func partition(_ host: String, from other: String) throws {
        let target = self.host(host), peer = self.host(other)
        for rule in partitionRules(peer.address) { try insertRule(rule, in: target) }
        updateImpairments(of: host) { $0.partitions.insert(other) }
    }

    /// Undoes `partition(host, from: other)`. Idempotent.
    public func heal(_ host: String, from other: String) throws {
        let target = self.host(host), peer = self.host(other)
        for rule in partitionRules(peer.address) { try deleteRule(rule, in: target) }
        updateImpairments(of: host) { $0.partitions.remove(other) }
    }

    /// Every packet the host sends on its `eth0` is held `milliseconds` before it leaves (an
    /// NFQUEUE rule on OUTPUT, answered by a PacketDelayer in the host's namespace); 0 undoes it.
    /// Calling it again changes the delay of packets queued from then on.
    public func delay(_ host: String, milliseconds: Int) throws {
        let target = self.host(host)
        if milliseconds <= 0 {
            try removeDelay(of: target)
            return
        }
        if let delayer = lock.withLock({ impairments[host]?.delayer }) {
            delayer.setDelay(milliseconds: milliseconds)
            return
        }
        let delayer = try withNetwork(of: host) { try PacketDelayer(queue: Self.delayQueue, milliseconds: milliseconds) }
        updateImpairments(of: host) { $0.delayer = delayer }
        let rule = ["OUTPUT", "-o", Self.hostInterface, "-j", "NFQUEUE", "--queue-num", "\(Self.delayQueue)", "--queue-bypass"]
        try appendRule(rule, in: target)
        updateImpairments(of: host) { $0.delayRule = rule }
    }

    /// Drops `percent` % of the packets the host receives and, independently, of those it sends
    /// on `eth0` (iptables statistic match); 0 undoes it. Replaces an earlier loss.
    public func loss(_ host: String, percent: Double) throws {
        let target = self.host(host)
        for rule in lock.withLock({ impairments[host]?.lossRules ?? [] }) { try deleteRule(rule, in: target) }
        updateImpairments(of: host) { $0.lossRules = [] }
        guard percent > 0 else { return }
        let probability = String(format: "%.5f", min(percent, 100) / 100)
        let rules = [("INPUT", "-i"), ("OUTPUT", "-o")].map { chain, direction in
            [chain, direction, Self.hostInterface, "-m", "statistic", "--mode", "random", "--probability", probability, "-j", "DROP"]
        }
        for rule in rules {
            try insertRule(rule, in: target)
            updateImpairments(of: host) { $0.lossRules.append(rule) }
        }
    }

    /// Undoes delay and loss (not partitions, not the link).
    public func clearImpairments(_ host: String) throws {
        try removeDelay(of: self.host(host))
        try loss(host, percent: 0)
    }

    private func removeDelay(of target: Host) throws {
        let (rule, delayer) = lock.withLock { (impairments[target.name]?.delayRule, impairments[target.name]?.delayer) }
        // The rule goes first: from then on no packet is queued; the delayer then lets out
        // what it still holds and unbinds.
        if let rule { try deleteRule(rule, in: target) }
        delayer?.stop()
        updateImpairments(of: target.name) {
            $0.delayRule = nil
            $0.delayer = nil
        }
    }

    private func partitionRules(_ address: String) -> [[String]] {
        [["INPUT", "-s", address, "-j", "DROP"], ["OUTPUT", "-d", address, "-j", "DROP"]]
    }

    private func updateImpairments(of host: String, _ change: (inout Impairments) -> Void) {
        lock.withLock { change(&impairments[host, default: Impairments()]) }
    }

    // MARK: - iptables in a host

    private func iptables(_ target: Host, _ arguments: [String]) throws {
        _ = try runIn(namespace: target.namespace, "iptables", ["-w", "5"] + arguments, timeout: 15)
    }

    private func hasRule(_ rule: [String], in target: Host) -> Bool {
        (try? iptables(target, ["-C"] + rule)) != nil
    }

    private func insertRule(_ rule: [String], in target: Host) throws {
        if !hasRule(rule, in: target) { try iptables(target, ["-I"] + rule) }
    }

    private func appendRule(_ rule: [String], in target: Host) throws {
        if !hasRule(rule, in: target) { try iptables(target, ["-A"] + rule) }
    }

    private func deleteRule(_ rule: [String], in target: Host) throws {
        // -C is not enough to be sure: the same rule may have been added twice by hand.
        for _ in 0..<8 where hasRule(rule, in: target) { try iptables(target, ["-D"] + rule) }
    }
}
