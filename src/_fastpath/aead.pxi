# Transport AEAD and replay window (stub; replaced by the wg-aead branch).

from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

from includes.openssl cimport (
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CipherFinal_ex,
    EVP_CipherInit_ex,
    EVP_CipherUpdate,
    EVP_CTRL_AEAD_GET_TAG,
    EVP_CTRL_AEAD_SET_TAG,
    EVP_chacha20_poly1305,
)

cdef AeadCtx *aead_new() noexcept nogil:
    return EVP_CIPHER_CTX_new()

cdef void aead_free(AeadCtx *c) noexcept nogil:
    EVP_CIPHER_CTX_free(c)

cdef inline void _nonce(uint8_t *iv, uint64_t counter) noexcept nogil:
    cdef int i
    memset(iv, 0, 12)
    for i in range(8):
        iv[4 + i] = <uint8_t>(counter >> (8 * i))

cdef int aead_seal(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                   Py_ssize_t n) noexcept nogil:
    cdef uint8_t iv[12]
    cdef int outl = 0
    _nonce(iv, counter)
    if EVP_CipherInit_ex(c, EVP_chacha20_poly1305(), NULL, key, iv, 1) != 1:
        return -1
    if n and EVP_CipherUpdate(c, buf, &outl, buf, <int>n) != 1:
        return -1
    if EVP_CipherFinal_ex(c, buf + n, &outl) != 1:
        return -1
    return 0 if EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG, buf + n) == 1 else -1

cdef Py_ssize_t aead_open(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                          Py_ssize_t n) noexcept nogil:
    cdef uint8_t iv[12]
    cdef int outl = 0
    cdef Py_ssize_t m = n - AEAD_TAG
    if m < 0:
        return -1
    _nonce(iv, counter)
    if EVP_CipherInit_ex(c, EVP_chacha20_poly1305(), NULL, key, iv, 0) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG, buf + m) != 1:
        return -1
    if m and EVP_CipherUpdate(c, buf, &outl, buf, <int>m) != 1:
        return -1
    if EVP_CipherFinal_ex(c, buf + m, &outl) != 1:
        return -1
    return m

cdef void rw_init(ReplayWin *w) noexcept nogil:
    memset(w, 0, sizeof(ReplayWin))

cdef bint rw_fresh(const ReplayWin *w, uint64_t counter) noexcept nogil:
    if counter >= <uint64_t>0xFFFFFFFFFFFFDFFF:
        return False
    if counter >= w.next:
        return True
    if counter + (RW_BITS - 64) < w.next:
        return False
    return not (w.bits[(counter >> 6) % RW_WORDS] >> (counter & 63)) & 1

cdef bint rw_accept(ReplayWin *w, uint64_t counter) noexcept nogil:
    cdef uint64_t i, cur, top
    if not rw_fresh(w, counter):
        return False
    if counter >= w.next:
        # `cur` is the word of the highest counter accepted so far (next - 1): the
        # words after it, up to the new highest's, stand for newer counters now and
        # lose their old bits. (From `next` itself, a new word that begins exactly at
        # next kept the bits of counters a ring below and refused them as replays.)
        cur = (w.next - 1) >> 6 if w.next else 0
        top = counter >> 6
        if w.next == 0:
            memset(w.bits, 0, sizeof(w.bits))
        else:
            i = cur + 1
            while i <= top and i - cur <= RW_WORDS:
                w.bits[i % RW_WORDS] = 0
                i += 1
        w.next = counter + 1
    w.bits[(counter >> 6) % RW_WORDS] |= (<uint64_t>1) << (counter & 63)
    return True
