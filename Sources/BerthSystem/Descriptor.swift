import Glibc

/// An owned file descriptor. Exactly one `Descriptor` owns a given open fd; it cannot be copied.
///
/// Close it explicitly with `close()` (idempotent); one dropped while still open is a bug: debug
/// builds trap, release builds close it so that nothing leaks. Code that registered the fd with an
/// epoll instance deregisters it before closing (see `Epoll.remove`).
public struct Descriptor: ~Copyable {
    /// The raw fd, or -1 once closed or released.
    public private(set) var raw: CInt

    /// Takes ownership of `raw` (which may be -1 for "none").
    public init(adopting raw: CInt) {
        self.raw = raw
    }

    /// A descriptor that owns nothing.
    public static var none: Descriptor { Descriptor(adopting: -1) }

    public var isOpen: Bool { raw >= 0 }

    /// Closes the fd if open. Safe to call again.
    public mutating func close() {
        guard raw >= 0 else { return }
        closeDescriptor(raw)
        raw = -1
    }

    /// Gives up ownership without closing (handing the fd to another owner, e.g. another thread).
    public mutating func release() -> CInt {
        let fd = raw
        raw = -1
        return fd
    }

    /// Replaces what this owns; the previous fd must already be closed or released.
    public mutating func adopt(_ fd: CInt) {
        precondition(raw < 0, "Descriptor.adopt over open fd \(raw)")
        raw = fd
    }

    deinit {
        if raw >= 0 {
            assertionFailure("descriptor \(raw) dropped while open")
            closeDescriptor(raw)
        }
    }
}
