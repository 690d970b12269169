import COpenSSL
import Glibc
import Synchronization

/// A nonblocking TLS client on an already connected socket, through the system's OpenSSL.
/// Used by health checks only; owned by the checker's loop thread.
final class TLSClient {
    enum Step: Equatable {
        case done(Int)
        case wantRead
        case wantWrite
        /// The peer closed the TLS session.
        case closed
        case failed(String)
    }

    private let ssl: OpaquePointer

    /// Contexts by CA file ("" for no verification), made once, shared by the checker's probes.
    private static let contexts = Mutex<[String: UInt]>([:])

    private static func context(caFile: String?) -> Result<OpaquePointer, TLSError> {
        let key = caFile ?? ""
        return contexts.withLock { contexts in
            if let existing = contexts[key], let pointer = OpaquePointer(bitPattern: existing) { return .success(pointer) }
            guard let context = SSL_CTX_new(TLS_client_method()) else {
                return .failure(TLSError(text: "SSL_CTX_new failed: \(lastError())"))
            }
            copenssl_set_auto_retry_off(context)
            if let caFile {
                guard SSL_CTX_load_verify_locations(context, caFile, nil) == 1 else {
                    SSL_CTX_free(context)
                    return .failure(TLSError(text: "cannot load CA file \(caFile): \(lastError())"))
                }
                copenssl_set_verify_peer(context)
            } else {
                copenssl_set_verify_none(context)
            }
            contexts[key] = UInt(bitPattern: context)
            return .success(context)
        }
    }

    struct TLSError: Error {
        let text: String
    }

    init(fd: CInt, check: TLSCheck) throws(TLSError) {
        let context: OpaquePointer
        switch Self.context(caFile: check.caFile) {
        case .success(let value): context = value
        case .failure(let error): throw error
        }
        guard let ssl = SSL_new(context) else { throw TLSError(text: "SSL_new failed: \(Self.lastError())") }
        self.ssl = ssl
        SSL_set_fd(ssl, fd)
        SSL_set_connect_state(ssl)
        if let name = check.serverName {
            _ = copenssl_set_server_name(ssl, name)
            if check.caFile != nil { SSL_set1_host(ssl, name) }
        }
    }

    deinit {
        SSL_free(ssl)
    }

    func handshake() -> Step {
        ERR_clear_error()
        let result = SSL_do_handshake(ssl)
        if result == 1 { return .done(0) }
        return step(for: result, doing: "handshake")
    }

    func write(_ bytes: UnsafeRawBufferPointer) -> Step {
        ERR_clear_error()
        let result = SSL_write(ssl, bytes.baseAddress, CInt(bytes.count))
        if result > 0 { return .done(Int(result)) }
        return step(for: result, doing: "write")
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) -> Step {
        ERR_clear_error()
        let result = SSL_read(ssl, buffer.baseAddress, CInt(buffer.count))
        if result > 0 { return .done(Int(result)) }
        return step(for: result, doing: "read")
    }

    private func step(for result: CInt, doing operation: String) -> Step {
        let code = SSL_get_error(ssl, result)
        if code == copenssl_error_want_read() { return .wantRead }
        if code == copenssl_error_want_write() { return .wantWrite }
        if code == copenssl_error_zero_return() { return .closed }
        let verify = SSL_get_verify_result(ssl)
        if verify != X509_V_OK {
            return .failed("TLS \(operation): certificate verify failed: \(String(cString: X509_verify_cert_error_string(verify)))")
        }
        let detail = Self.lastError()
        if detail.isEmpty {
            return .failed(result == 0 ? "TLS \(operation): connection closed by peer" : "TLS \(operation): \(String(cString: strerror(errno)))")
        }
        return .failed("TLS \(operation): \(detail)")
    }

    static func lastError() -> String {
        let code = ERR_get_error()
        guard code != 0 else { return "" }
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
