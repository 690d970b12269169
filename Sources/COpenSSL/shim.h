// The system's OpenSSL (Debian: libssl-dev), for TLS health checks. Macros that Swift cannot
// call are wrapped as static inline functions here.
#ifndef COPENSSL_SHIM_H
#define COPENSSL_SHIM_H
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

static inline long copenssl_set_server_name(SSL *ssl, const char *name) {
    return SSL_set_tlsext_host_name(ssl, name);
}

static inline void copenssl_set_verify_peer(SSL_CTX *context) {
    SSL_CTX_set_verify(context, SSL_VERIFY_PEER, NULL);
}

static inline void copenssl_set_verify_none(SSL_CTX *context) {
    SSL_CTX_set_verify(context, SSL_VERIFY_NONE, NULL);
}

static inline int copenssl_error_want_read(void) { return SSL_ERROR_WANT_READ; }
static inline int copenssl_error_want_write(void) { return SSL_ERROR_WANT_WRITE; }
static inline int copenssl_error_zero_return(void) { return SSL_ERROR_ZERO_RETURN; }

static inline void copenssl_set_auto_retry_off(SSL_CTX *context) {
    SSL_CTX_clear_mode(context, SSL_MODE_AUTO_RETRY);
}
#endif
