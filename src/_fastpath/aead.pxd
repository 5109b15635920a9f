# WireGuard's transport crypto (prefixes aead_ and rw_): ChaCha20-Poly1305 sealing and
# opening of one message in place, and the receive side's replay window.
#
# * aead_: ChaCha20-Poly1305 (RFC 8439) from OpenSSL libcrypto, with WireGuard's nonce (4 zero
#   bytes, then the message counter as 8 bytes little-endian) and no associated data. An
#   AeadCtx wraps one EVP_CIPHER_CTX, which is not safe to share: one per thread. The key is
#   passed on every call (callers keep their own copy per keypair), so one context serves every
#   peer. bench/NOTES.md, "Transport encryption", says what a call costs and why OpenSSL.
# * rw_: which counters a session has received, as wireguard-go's replay.Filter (RFC 6479): a
#   ring of RW_WORDS 64-bit words, one bit per counter; moving forward clears whole words, so
#   the window is RW_BITS - 64 counters below the highest. Not thread-safe: the caller
#   serialises the receives of one session.
#
# The reference these are tested against: conn25.core.wireguard.transport.

from libc.stdint cimport uint8_t, uint64_t

from includes.openssl cimport EVP_CIPHER_CTX


cdef enum:
    AEAD_KEY = 32
    AEAD_TAG = 16
    RW_BITS = 8192          # ring of RW_BITS bits, window RW_BITS - 64 like wireguard-go
    RW_WORDS = RW_BITS // 64


# REJECT_AFTER_MESSAGES: no counter at or above it is ever accepted (WireGuard's limit,
# 2^64 - 2^13 - 1). Out of the enum: it does not fit an int.
cdef extern from *:
    """
    #define C25_REJECT_AFTER_MESSAGES (UINT64_MAX - 8192ULL)
    """
    const uint64_t REJECT_AFTER_MESSAGES "C25_REJECT_AFTER_MESSAGES"


ctypedef struct AeadCtx:
    # Opaque to callers. The cipher is set once in aead_new: giving it on every call costs
    # 400 to 500 ns more per message with OpenSSL 3 (bench/aead_cost.c).
    EVP_CIPHER_CTX *evp


cdef struct ReplayWin:
    uint64_t next          # one more than the highest counter accepted (0: none yet)
    uint64_t bits[RW_WORDS]


cdef AeadCtx *aead_new() noexcept nogil
cdef void aead_free(AeadCtx *c) noexcept nogil
cdef int aead_seal(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                   Py_ssize_t n) noexcept nogil
cdef Py_ssize_t aead_open(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                          Py_ssize_t n) noexcept nogil

cdef void rw_init(ReplayWin *w) noexcept nogil
cdef bint rw_fresh(const ReplayWin *w, uint64_t counter) noexcept nogil
cdef bint rw_accept(ReplayWin *w, uint64_t counter) noexcept nogil
