import BerthSystem
import Glibc
import Synchronization

/// The sockets of one frontend's listener group: the address asked for, the address bound, and
/// the SO_REUSEPORT sockets (raw fds, owned by whoever holds the group: see `ControlState`).
struct ListenerGroup: Sendable {
    var requested: SocketAddress
    var bound: SocketAddress
    var fds: [CInt]

    /// A frontend asking for `address` is served by this group: the same address, or the
    /// address it is bound to (a caller that asked for port 0 may pass the port it got).
    func serves(_ address: SocketAddress) -> Bool {
        requested == address || (bound == address && address.port != 0)
    }

    /// The sockets each of `workers` workers polls: socket i goes to worker i mod workers, so
    /// no socket is left without a worker whatever the counts.
    func distribute(over workers: Int) -> [[CInt]] {
        var result = Array(repeating: [CInt](), count: workers)
        for (index, fd) in fds.enumerated() { result[index % workers].append(fd) }
        return result
    }
}

/// The engine's side of a takeover (`TakeoverMessage`): the running process exports duplicates
/// of its listening sockets; the new one adopts them before its first `apply`, which then uses
/// them instead of binding, so no connection waiting in an accept queue is lost.
extension Engine {
    /// The frontends listening now; a duplicate of each of their sockets is added to `batch`
    /// (which owns them: the caller sends and then closes them). A failed dup closes them.
    public func exportListeners(version: String, leaseID: Int64?, into batch: inout DescriptorBatch) throws(SystemError) -> TakeoverOffer {
        try control.withLock { state throws(SystemError) -> TakeoverOffer in
            var offer = TakeoverOffer(version: version, leaseID: leaseID)
            guard !state.stopped else { return offer }
            do throws(SystemError) {
                for (name, group) in state.listening.sorted(by: { $0.key < $1.key }) where !group.fds.isEmpty {
                    for fd in group.fds { batch.append(contentsOf: [try UnixSockets.duplicate(fd)]) }
                    offer.frontends.append(.init(name: name, requested: group.requested, bound: group.bound, count: group.fds.count))
                }
            } catch {
                batch.close()
                throw error
            }
            return offer
        }
    }

    /// Keeps the sockets of `offer` (taken from `descriptors`, in the offer's order) for the
    /// frontends of later tables at the same addresses. Returns false, leaving the descriptors
    /// with the caller, when the engine is stopped or the counts disagree.
    public func adopt(_ offer: TakeoverOffer, descriptors: inout DescriptorBatch) -> Bool {
        guard descriptors.count == offer.descriptorCount else { return false }
        return control.withLock { state in
            guard !state.stopped else { return false }
            for frontend in offer.frontends {
                state.adopted.append(ListenerGroup(requested: frontend.requested, bound: frontend.bound,
                                                   fds: descriptors.take(frontend.count)))
            }
            return true
        }
    }

    /// Closes the adopted sockets no frontend took (a frontend the new table no longer has, or
    /// whose address changed) and returns their addresses. Called once the running process has
    /// let go of them: until then, its copies keep serving their queues.
    public func closeUnusedAdopted() -> [SocketAddress] {
        control.withLock { state in
            let unused = state.adopted
            state.adopted = []
            for group in unused { for fd in group.fds { closeDescriptor(fd) } }
            return unused.map(\.bound)
        }
    }

    /// The adopted group for a frontend at `address`, if any, removed from `adopted`. With
    /// fewer sockets than workers, more of the group are bound (SO_REUSEPORT): every worker
    /// accepts. A failure to bind them only leaves those workers out.
    func takeAdopted(_ address: SocketAddress, from adopted: inout [ListenerGroup]) -> ListenerGroup? {
        guard let index = adopted.firstIndex(where: { $0.serves(address) }) else { return nil }
        var group = adopted.remove(at: index)
        while group.fds.count < handles.count, let fd = try? Self.openListener(group.bound) {
            group.fds.append(fd)
        }
        return group
    }
}
