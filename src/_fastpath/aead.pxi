# ChaCha20-Poly1305 over OpenSSL and the replay window; the declarations, and why they look
# as they do, are in aead.pxd.

from libc.limits cimport INT_MAX
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from includes.openssl cimport (
    EVP_CIPHER_CTX_ctrl,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CTRL_AEAD_GET_TAG,
    EVP_CTRL_AEAD_SET_TAG,
    EVP_CipherFinal_ex,
    EVP_CipherInit_ex,
    EVP_CipherUpdate,
    EVP_chacha20_poly1305,
)


cdef AeadCtx *aead_new() noexcept nogil:
    cdef AeadCtx *c = <AeadCtx *>malloc(sizeof(AeadCtx))
    if c == NULL:
        return NULL
    c.evp = EVP_CIPHER_CTX_new()
    # The cipher once, here: per message only key and nonce are set (see AeadCtx).
    if c.evp == NULL or EVP_CipherInit_ex(c.evp, EVP_chacha20_poly1305(), NULL,
                                          NULL, NULL, 1) != 1:
        aead_free(c)
        return NULL
    return c


cdef void aead_free(AeadCtx *c) noexcept nogil:
    if c != NULL:
        EVP_CIPHER_CTX_free(c.evp)      # accepts NULL
        free(c)


cdef inline bint _aead_start(AeadCtx *c, const uint8_t *key, uint64_t counter,
                             int enc) noexcept nogil:
    # WireGuard's 96-bit nonce: 32 zero bits, then the counter little-endian (whitepaper
    # 5.4.6), written byte by byte so it does not depend on the host's byte order.
    cdef uint8_t iv[12]
    cdef int i
    iv[0] = iv[1] = iv[2] = iv[3] = 0
    for i in range(8):
        iv[4 + i] = <uint8_t>(counter >> (8 * i))
    return EVP_CipherInit_ex(c.evp, NULL, NULL, key, iv, enc) == 1


cdef int aead_seal(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                   Py_ssize_t n) noexcept nogil:
    cdef int outl = 0, fin = 0
    # EVP counts in int; the tag must fit after the text.
    if n < 0 or n > INT_MAX - AEAD_TAG or not _aead_start(c, key, counter, 1):
        return -1
    # No update for an empty text (a keepalive): nothing to encrypt, and Final alone
    # authenticates the empty message.
    if n and (EVP_CipherUpdate(c.evp, buf, &outl, buf, <int>n) != 1 or outl != n):
        return -1
    if EVP_CipherFinal_ex(c.evp, buf + outl, &fin) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(c.evp, EVP_CTRL_AEAD_GET_TAG, AEAD_TAG, buf + n) != 1:
        return -1
    return 0


cdef Py_ssize_t aead_open(AeadCtx *c, const uint8_t *key, uint64_t counter, uint8_t *buf,
                          Py_ssize_t n) noexcept nogil:
    cdef int outl = 0, fin = 0
    cdef Py_ssize_t m = n - AEAD_TAG
    if m < 0 or n > INT_MAX or not _aead_start(c, key, counter, 0):
        return -1
    # The expected tag before the text: Final compares against it.
    if EVP_CIPHER_CTX_ctrl(c.evp, EVP_CTRL_AEAD_SET_TAG, AEAD_TAG, buf + m) != 1:
        return -1
    if m and (EVP_CipherUpdate(c.evp, buf, &outl, buf, <int>m) != 1 or outl != m):
        return -1
    # Final fails when the tag does not verify; the caller must then drop buf, which already
    # holds the unauthenticated plaintext.
    if EVP_CipherFinal_ex(c.evp, buf + outl, &fin) != 1:
        return -1
    return m


cdef void rw_init(ReplayWin *w) noexcept nogil:
    # All words zero: rw_accept relies on it while nothing was accepted (next == 0), when
    # there is no previous highest word to clear from.
    memset(w, 0, sizeof(ReplayWin))


cdef bint rw_fresh(const ReplayWin *w, uint64_t counter) noexcept nogil:
    if counter >= REJECT_AFTER_MESSAGES:
        return False
    if counter >= w.next:
        return True
    # Here next >= 1. More than RW_BITS - 64 below the highest, the counter's word may have
    # been reused for newer counters, so its bit says nothing. Exactly RW_BITS - 64 below is
    # refused too, to match transport.ReplayWindow (wireguard-go accepts that one counter:
    # the difference only drops a message reordered by exactly that much).
    if w.next - 1 - counter >= RW_BITS - 64:
        return False
    return not ((w.bits[(counter >> 6) & (RW_WORDS - 1)] >> (counter & 63)) & 1)


cdef bint rw_accept(ReplayWin *w, uint64_t counter) noexcept nogil:
    cdef uint64_t cur, diff, i
    if not rw_fresh(w, counter):
        return False
    if counter >= w.next:
        if w.next:
            # New highest: the words after the old highest's, up to the new one's, now
            # stand for newer counters, so their old bits go. A jump of RW_WORDS words or
            # more clears the whole ring (and never loops 2^58 times).
            cur = (w.next - 1) >> 6
            diff = (counter >> 6) - cur
            if diff > RW_WORDS:
                diff = RW_WORDS
            i = 1
            while i <= diff:
                w.bits[(cur + i) & (RW_WORDS - 1)] = 0
                i += 1
        w.next = counter + 1
    w.bits[(counter >> 6) & (RW_WORDS - 1)] |= (<uint64_t>1) << (counter & 63)
    return True
