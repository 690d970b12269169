// Delay for NetworkTestBed hosts, through NFQUEUE.
//
// Why not netem: this machine's kernel (6.18, no loadable modules) has no netem qdisc (`tc qdisc
// add … netem` fails; only htb and pfifo exist), and the tests must run on it. NFQUEUE is built
// in: an iptables rule hands each outgoing packet to a user-space queue, and the packet leaves
// only when the program bound to that queue answers with a verdict. This class is that program:
// it answers NF_ACCEPT for every packet, `delay` after it was queued, in arrival order.
//
// Raw netlink (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_QUEUE), no libnetfilter_queue:
//   bind:    NFQNL_MSG_CONFIG { NFQA_CFG_CMD bind } then { NFQA_CFG_PARAMS copy meta,
//            NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_FLAGS fail-open }, each acknowledged
//   packets: NFQNL_MSG_PACKET { NFQA_PACKET_HDR: packet id (big-endian), … }
//   answer:  NFQNL_MSG_VERDICT { NFQA_VERDICT_HDR: NF_ACCEPT, id (both big-endian) }
// Headers (nlmsghdr, nlattr) are in host order, payloads in network order.
//
// Bounds: at most `maximumHeld` packets are held (past it a packet is accepted at once); the
// kernel queue has the same length and fails open (accepts) when full, and the iptables rule has
// --queue-bypass, so a dead delayer (no socket bound) never blackholes the host.
import BerthSystem
import Glibc
import Synchronization

final class PacketDelayer: @unchecked Sendable {
    static let maximumHeld = 4096
    /// Datagrams read per wakeup before due verdicts are sent again.
    static let readsPerWakeup = 64
    /// Verdicts (32 bytes each) sent together in one datagram, well under the socket's send buffer.
    static let verdictBytesPerSend = 32 * 1024

    let queue: UInt16
    private let socket: CInt
    private let delayNanoseconds: Atomic<Int>
    private let stopping = Atomic<Bool>(false)
    private var thread: OSThread?

    // Netlink constants (linux/netlink.h, linux/netfilter/nfnetlink_queue.h).
    private static let netlinkNetfilter: CInt = 12
    private static let subsystemQueue: UInt16 = 3
    private static let messagePacket: UInt16 = subsystemQueue << 8 | 0
    private static let messageVerdict: UInt16 = subsystemQueue << 8 | 1
    private static let messageConfig: UInt16 = subsystemQueue << 8 | 2
    private static let netlinkError: UInt16 = 2
    private static let flagRequest: UInt16 = 1, flagAck: UInt16 = 4
    private static let configCommand: UInt16 = 1, configParameters: UInt16 = 2, configMaximumLength: UInt16 = 3
    private static let configMask: UInt16 = 4, configFlags: UInt16 = 5
    private static let commandBind: UInt8 = 1, commandUnbind: UInt8 = 2
    private static let copyMeta: UInt8 = 1
    private static let failOpen: UInt32 = 1
    private static let packetHeader: UInt16 = 1, verdictHeader: UInt16 = 2
    private static let accept: UInt32 = 1
    private static let netlinkNoENOBUFS: CInt = 5, solNetlink: CInt = 270

    /// Binds `queue` in the calling thread's network namespace (call it inside
    /// `NetworkTestBed.withNetwork`) and starts the thread that answers.
    init(queue: UInt16, milliseconds: Int) throws {
        self.queue = queue
        delayNanoseconds = Atomic(milliseconds * 1_000_000)
        let fd = Glibc.socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Self.netlinkNetfilter)
        guard fd >= 0 else { throw FixtureFailure("netlink socket: \(String(cString: strerror(errno)))") }
        socket = fd
        do {
            try configure()
        } catch {
            // Fully initialised, so deinit will run `stop()`: mark it stopped, or it would close
            // the fd a second time (by then maybe another file's).
            stopping.store(true, ordering: .relaxed)
            close(fd)
            throw error
        }
        thread = OSThread(name: "nfq-delay-\(queue)") { [self] in run() }
    }

    deinit { stop() }

    func setDelay(milliseconds: Int) {
        delayNanoseconds.store(milliseconds * 1_000_000, ordering: .relaxed)
    }

    /// Stops the thread, accepts every packet still held, unbinds and closes. Idempotent.
    func stop() {
        // The first call flips `stopping` (what the thread polls) and does the rest.
        guard stopping.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        thread?.join()
        thread = nil
        _ = try? request(config(command: Self.commandUnbind))
        close(socket)
    }

    private func configure() throws {
        var size: CInt = 4 << 20
        setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<CInt>.size))
        var on: CInt = 1
        setsockopt(socket, Self.solNetlink, Self.netlinkNoENOBUFS, &on, socklen_t(MemoryLayout<CInt>.size))
        var address = [UInt8](repeating: 0, count: 12)  // sockaddr_nl: family, pad, pid 0 (kernel picks), groups 0
        address[0] = UInt8(AF_NETLINK & 0xff)
        address[1] = UInt8(AF_NETLINK >> 8)
        let bound = address.withUnsafeBytes {
            bind(socket, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        guard bound == 0 else { throw FixtureFailure("netlink bind: \(String(cString: strerror(errno)))") }
        try request(config(command: Self.commandBind))
        var parameters = NetlinkMessage(type: Self.messageConfig, flags: Self.flagRequest | Self.flagAck, queue: queue)
        parameters.attribute(Self.configParameters, bigEndian(UInt32(0)) + [Self.copyMeta])
        parameters.attribute(Self.configMaximumLength, bigEndian(UInt32(Self.maximumHeld)))
        parameters.attribute(Self.configMask, bigEndian(Self.failOpen))
        parameters.attribute(Self.configFlags, bigEndian(Self.failOpen))
        try request(parameters)
    }

    private func config(command: UInt8) -> NetlinkMessage {
        var message = NetlinkMessage(type: Self.messageConfig, flags: Self.flagRequest | Self.flagAck, queue: queue)
        message.attribute(Self.configCommand, [command, 0] + bigEndian(UInt16(AF_INET)))
        return message
    }

    /// Sends a message that asks for an acknowledgement and waits (2 s) for it; throws on a
    /// netlink error. Only before the thread starts or after it ended.
    private func request(_ message: NetlinkMessage) throws {
        try send(message.bytes)
        var buffer = [UInt8](repeating: 0, count: 8192)
        let deadline = monotonicSeconds() + 2
        while monotonicSeconds() < deadline {
            var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, 100) > 0 else { continue }
            let got = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if got < 0 { if errno == EINTR || errno == EAGAIN { continue }; throw FixtureFailure("netlink recv: \(String(cString: strerror(errno)))") }
            for (type, payload) in Self.messages(buffer[0..<got]) where type == Self.netlinkError {
                let code = payload.count >= 4 ? Int32(bitPattern: Self.hostUInt32(payload, payload.startIndex)) : -1
                guard code == 0 else { throw FixtureFailure("NFQUEUE \(queue) config: \(String(cString: strerror(-code)))") }
                return
            }
        }
        throw FixtureFailure("NFQUEUE \(queue): no acknowledgement from the kernel")
    }

    private func send(_ bytes: [UInt8]) throws {
        while true {
            let sent = bytes.withUnsafeBytes { Glibc.send(socket, $0.baseAddress, $0.count, 0) }
            if sent == bytes.count { return }
            if sent < 0 && errno == EINTR { continue }
            throw FixtureFailure("netlink send: \(sent < 0 ? String(cString: strerror(errno)) : "short write")")
        }
    }

    // MARK: - The thread

    private func run() {
        var held: [(id: UInt32, due: Double)] = []
        var head = 0
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        while !stopping.load(ordering: .relaxed) {
            let now = monotonicSeconds()
            var verdicts: [UInt8] = []
            while head < held.count, held[head].due <= now {
                verdicts += verdict(for: held[head].id)
                head += 1
                if verdicts.count >= Self.verdictBytesPerSend { try? send(verdicts); verdicts = [] }
            }
            if head > 1024 { held.removeFirst(head); head = 0 }
            if !verdicts.isEmpty { try? send(verdicts) }
            let wait = head < held.count ? max(0, held[head].due - now) : 0.1
            var descriptor = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            guard poll(&descriptor, 1, CInt(min(wait, 0.1) * 1000) + (wait > 0 ? 1 : 0)) > 0 else { continue }
            let delay = Double(delayNanoseconds.load(ordering: .relaxed)) / 1e9
            for _ in 0..<Self.readsPerWakeup {
                let got = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
                if got <= 0 { break }
                let arrived = monotonicSeconds()
                var immediate: [UInt8] = []
                for (type, payload) in Self.messages(buffer[0..<got]) where type == Self.messagePacket {
                    guard let id = Self.packetID(payload) else { continue }
                    if held.count - head >= Self.maximumHeld {
                        immediate += verdict(for: id)
                    } else {
                        held.append((id, arrived + delay))
                    }
                }
                if !immediate.isEmpty { try? send(immediate) }
            }
        }
        // Whatever is still held, or queued and not read yet, leaves now: closing the socket
        // would make the kernel drop it. (The iptables rule is gone by now: nothing new comes.)
        var rest: [UInt8] = []
        for entry in held[head...] {
            rest += verdict(for: entry.id)
            if rest.count >= Self.verdictBytesPerSend { try? send(rest); rest = [] }
        }
        for _ in 0..<Self.readsPerWakeup {
            let got = buffer.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if got <= 0 { break }
            for (type, payload) in Self.messages(buffer[0..<got]) where type == Self.messagePacket {
                if let id = Self.packetID(payload) { rest += verdict(for: id) }
            }
            if rest.count >= Self.verdictBytesPerSend { try? send(rest); rest = [] }
        }
        if !rest.isEmpty { try? send(rest) }
    }

    private func verdict(for id: UInt32) -> [UInt8] {
        var message = NetlinkMessage(type: Self.messageVerdict, flags: Self.flagRequest, queue: queue)
        message.attribute(Self.verdictHeader, bigEndian(Self.accept) + bigEndian(id))
        return message.bytes
    }

    // MARK: - Parsing

    /// (type, payload after nlmsghdr) of each message in one datagram.
    private static func messages(_ data: ArraySlice<UInt8>) -> [(UInt16, ArraySlice<UInt8>)] {
        var result: [(UInt16, ArraySlice<UInt8>)] = []
        var offset = data.startIndex
        while offset + 16 <= data.endIndex {
            let length = Int(hostUInt32(data, offset))
            guard length >= 16, offset + length <= data.endIndex else { break }
            let type = UInt16(data[offset + 4]) | UInt16(data[offset + 5]) << 8
            result.append((type, data[(offset + 16)..<(offset + length)]))
            offset += (length + 3) & ~3
        }
        return result
    }

    /// The packet id in NFQA_PACKET_HDR of a packet message's payload (nfgenmsg, then attributes).
    private static func packetID(_ payload: ArraySlice<UInt8>) -> UInt32? {
        var offset = payload.startIndex + 4
        while offset + 4 <= payload.endIndex {
            let length = Int(UInt16(payload[offset]) | UInt16(payload[offset + 1]) << 8)
            let type = (UInt16(payload[offset + 2]) | UInt16(payload[offset + 3]) << 8) & 0x3fff
            guard length >= 4, offset + length <= payload.endIndex else { return nil }
            if type == packetHeader, length >= 8 {
                return payload[(offset + 4)..<(offset + 8)].reduce(0) { $0 << 8 | UInt32($1) }
            }
            offset += (length + 3) & ~3
        }
        return nil
    }

    private static func hostUInt32(_ data: ArraySlice<UInt8>, _ offset: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(data[offset + $1]) << (8 * $1) }
    }
}

/// One nfnetlink message: nlmsghdr, nfgenmsg (family unspecified, version 0, queue number),
/// attributes padded to 4 bytes.
struct NetlinkMessage {
    private(set) var bytes: [UInt8]

    init(type: UInt16, flags: UInt16, queue: UInt16) {
        bytes = littleEndian(UInt32(0)) + littleEndian(type) + littleEndian(flags) + littleEndian(UInt32(0)) + littleEndian(UInt32(0))
        bytes += [0, 0] + bigEndian(queue)
        setLength()
    }

    mutating func attribute(_ type: UInt16, _ payload: [UInt8]) {
        bytes += littleEndian(UInt16(4 + payload.count)) + littleEndian(type) + payload
        while bytes.count % 4 != 0 { bytes.append(0) }
        setLength()
    }

    private mutating func setLength() {
        let length = littleEndian(UInt32(bytes.count))
        bytes.replaceSubrange(0..<4, with: length)
    }
}

private func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
}

private func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}
