/// Finds where each HTTP/1.x response ends in a byte stream, without buffering it: status line,
/// header lines (only `Content-Length` is read), then a body of exactly Content-Length bytes.
/// Responses without Content-Length (chunked, or close-delimited) are reported as malformed: the
/// backends of the bench always send it. Pure: no I/O.
struct ResponseScanner {
    enum Step: Equatable {
        /// The bytes ended inside a response.
        case needMore
        /// A response ended; `status` is its status code.
        case complete(status: Int)
        /// Not a response the bench can delimit.
        case malformed
    }

    private enum Part {
        case statusLine
        case headers
        case body
    }

    private static let lengthHeader = Array("content-length:".utf8)
    /// Bound on a body the scanner accepts, and on a line's length.
    private static let bodyLimit = 1 << 40
    private static let lineLimit = 16 * 1024

    private var part = Part.statusLine
    /// Characters of the current line (carriage returns excluded).
    private var lineLength = 0
    private var status = 0
    /// Characters of "content-length:" matched at the start of this header line; -1: another header.
    private var matched = 0
    private var contentLength = -1
    private var bodyRemaining = 0

    /// Scans `bytes[offset...]` and stops right after the first response that ends there.
    /// Returns the offset reached and what was found.
    mutating func scan(_ bytes: UnsafeRawBufferPointer, from offset: Int) -> (offset: Int, step: Step) {
        var index = offset
        while index < bytes.count {
            if part == .body {
                let taken = min(bodyRemaining, bytes.count - index)
                bodyRemaining -= taken
                index += taken
                if bodyRemaining == 0 { return (index, finish()) }
                return (index, .needMore)
            }
            let byte = bytes[index]
            index += 1
            switch byte {
            case UInt8(ascii: "\r"):
                continue
            case UInt8(ascii: "\n"):
                if let step = endOfLine() { return (index, step) }
            default:
                lineLength += 1
                if lineLength > Self.lineLimit { return (index, .malformed) }
                if part == .statusLine {
                    // "HTTP/1.1 200 OK": the code is characters 10 to 12.
                    if lineLength >= 10 && lineLength <= 12 {
                        guard byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") else { return (index, .malformed) }
                        status = status * 10 + Int(byte - UInt8(ascii: "0"))
                    }
                } else {
                    headerCharacter(byte)
                }
            }
        }
        return (index, .needMore)
    }

    private mutating func headerCharacter(_ byte: UInt8) {
        if matched >= 0 && matched < Self.lengthHeader.count {
            let lower = byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte + 32 : byte
            matched = lower == Self.lengthHeader[matched] ? matched + 1 : -1
        } else if matched == Self.lengthHeader.count && byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
            contentLength = min(Self.bodyLimit, max(0, contentLength) * 10 + Int(byte - UInt8(ascii: "0")))
        }
    }

    /// A line ended: the status line, a header, or the blank line that ends the head.
    private mutating func endOfLine() -> Step? {
        defer {
            lineLength = 0
            matched = 0
        }
        switch part {
        case .statusLine:
            if lineLength == 0 { return nil }  // tolerate a stray CRLF between responses
            guard lineLength >= 12, status >= 100 else { return .malformed }
            part = .headers
            return nil
        case .headers:
            guard lineLength == 0 else { return nil }
            guard contentLength >= 0 else { return .malformed }
            if contentLength == 0 { return finish() }
            bodyRemaining = contentLength
            part = .body
            return nil
        case .body:
            return nil
        }
    }

    private mutating func finish() -> Step {
        let step = Step.complete(status: status)
        self = ResponseScanner()
        return step
    }
}
