import BerthSystem
import Glibc
import Synchronization

/// A takeover as the new process sees it: the running process's offer and its sockets, and
/// the connection on which to answer. Control-plane threads only (every call blocks, bounded
/// by the timeout given to `request`).
///
/// The caller adopts `descriptors` into its engine (`Engine.adopt`), installs its first table,
/// then calls `complete()`; on any failure `abort(reason:)`. Dropping it closes what is left.
public final class IncomingTakeover {
    public let offer: TakeoverOffer
    /// The offer's sockets, in its order; taken by `Engine.adopt`.
    public var descriptors: DescriptorBatch
    private var connection: Descriptor

    private init(offer: TakeoverOffer, descriptors: consuming DescriptorBatch, connection: consuming Descriptor) {
        self.offer = offer
        self.descriptors = descriptors
        self.connection = connection
    }

    deinit {
        descriptors.close()
        connection.close()
    }

    /// Asks whoever listens on `path` for its sockets. nil when nobody does (no file, or
    /// refused: a stale socket file). A peer that says something else, speaks another protocol,
    /// or says nothing within `timeoutMilliseconds` is a `TakeoverError`: the caller starts
    /// normally (and logs it).
    public static func request(path: String, version: String, timeoutMilliseconds: Int) throws(TakeoverError) -> IncomingTakeover? {
        var connection: Descriptor
        do {
            connection = try UnixSockets.connect(path: path, timeoutMilliseconds: timeoutMilliseconds)
        } catch where error.errno == ENOENT || error.errno == ECONNREFUSED {
            return nil
        } catch {
            throw .system(error)
        }
        var descriptors = DescriptorBatch()
        do throws(TakeoverError) {
            try TakeoverWire.send(connection.raw, .hello(protocolVersion: TakeoverMessage.protocolVersion, version: version))
            let reply = try TakeoverWire.receive(connection.raw)
            guard case .offer(let offer) = reply else { throw .unexpected("\(reply)") }
            guard offer.protocolVersion == TakeoverMessage.protocolVersion else {
                throw .protocolMismatch(offer.protocolVersion, version: offer.version)
            }
            try TakeoverWire.receiveDescriptors(connection.raw, count: offer.descriptorCount, into: &descriptors)
            return IncomingTakeover(offer: offer, descriptors: descriptors, connection: connection)
        } catch {
            descriptors.close()
            connection.close()
            throw error
        }
    }

    /// Tells the running process it has been taken over: it stops accepting and drains.
    public func complete() throws(TakeoverError) {
        defer { connection.close() }
        try TakeoverWire.send(connection.raw, .takenOver)
    }

    /// Tells the running process to carry on as it was; closes the sockets not adopted.
    public func abort(reason: String) {
        descriptors.close()
        try? TakeoverWire.send(connection.raw, .abort(reason: reason))
        connection.close()
    }
}

public enum TakeoverError: Error, CustomStringConvertible, Sendable {
    case system(SystemError)
    case message(TakeoverMessageError)
    case protocolMismatch(Int, version: String)
    case unexpected(String)

    public var description: String {
        switch self {
        case .system(let error): "\(error)"
        case .message(let error): "\(error)"
        case .protocolMismatch(let other, let version):
            "the running process (\(version)) speaks takeover protocol \(other), this one \(TakeoverMessage.protocolVersion)"
        case .unexpected(let what): "unexpected takeover message: \(what)"
        }
    }
}

/// Frames on a blocking unix socket (`TakeoverFrame`), each read bounded by its timeout.
enum TakeoverWire {
    static func send(_ fd: CInt, _ message: TakeoverMessage) throws(TakeoverError) {
        do {
            try UnixSockets.send(fd, TakeoverFrame.encode(message.encode()))
        } catch {
            throw .system(error)
        }
    }

    /// One message; descriptors attached to it (a peer off protocol) are closed: EPROTO.
    static func receive(_ fd: CInt) throws(TakeoverError) -> TakeoverMessage {
        var stray = DescriptorBatch()
        defer { stray.close() }
        return try mapping {
            let header = try UnixSockets.receive(fd, count: 4, descriptors: &stray, capacity: 0)
            guard let length = TakeoverFrame.length(header: header) else { throw TakeoverError.unexpected("a frame over \(TakeoverFrame.maximumLength) bytes") }
            let payload = try UnixSockets.receive(fd, count: length, descriptors: &stray, capacity: 0)
            return try TakeoverMessage.decode(payload)
        }
    }

    /// The offer's sockets follow it in empty frames of at most `descriptorsPerMessage` each.
    static func sendDescriptors(_ fd: CInt, _ fds: [CInt]) throws(TakeoverError) {
        var index = 0
        while index < fds.count {
            let chunk = Array(fds[index..<min(fds.count, index + UnixSockets.descriptorsPerMessage)])
            do {
                try UnixSockets.send(fd, TakeoverFrame.encode([]), descriptors: chunk)
            } catch {
                throw .system(error)
            }
            index += chunk.count
        }
    }

    static func receiveDescriptors(_ fd: CInt, count: Int, into batch: inout DescriptorBatch) throws(TakeoverError) {
        let frames = (count + UnixSockets.descriptorsPerMessage - 1) / UnixSockets.descriptorsPerMessage
        for _ in 0..<frames {
            try mapping {
                let header = try UnixSockets.receive(fd, count: 4, descriptors: &batch, capacity: count)
                guard TakeoverFrame.length(header: header) == 0 else { throw TakeoverError.unexpected("a descriptor frame with data") }
            }
        }
        if batch.count != count { throw .unexpected("\(batch.count) socket(s) received, \(count) offered") }
    }

    /// Runs `body`, turning what it throws into a `TakeoverError`.
    private static func mapping<Value>(_ body: () throws -> Value) throws(TakeoverError) -> Value {
        do {
            return try body()
        } catch let error as SystemError {
            throw .system(error)
        } catch let error as TakeoverMessageError {
            throw .message(error)
        } catch let error as TakeoverError {
            throw error
        } catch {
            throw .unexpected("\(error)")
        }
    }
}
