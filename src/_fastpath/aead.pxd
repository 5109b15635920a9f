# Transport AEAD and replay window (stub; replaced by the wg-aead branch).

from libc.stdint cimport uint8_t, uint64_t

from includes.openssl cimport EVP_CIPHER_CTX

cdef enum:
    AEAD_KEY = 32
    AEAD_TAG = 16
    RW_BITS = 8192
    RW_WORDS = 128

ctypedef EVP_CIPHER_CTX AeadCtx

cdef struct ReplayWin:
    uint64_t next
    uint64_t bits[<int>RW_WORDS]

cdef AeadCtx *aead_new() noexcept nogil
cdef void aead_free(AeadCtx *c) noexcept nogil
cdef int aead_seal(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                   Py_ssize_t n) noexcept nogil
cdef Py_ssize_t aead_open(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                          Py_ssize_t n) noexcept nogil
cdef void rw_init(ReplayWin *w) noexcept nogil
cdef bint rw_fresh(const ReplayWin *w, uint64_t counter) noexcept nogil
cdef bint rw_accept(ReplayWin *w, uint64_t counter) noexcept nogil
