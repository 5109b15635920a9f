# Internet checksum primitives (RFC 1071) and incremental update (RFC 1624).
#
# Prefix cs_. Inline: the NAT code fixes headers in place with them, per
# packet. The def wrappers (checksum.pxi) exist for Python callers and tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef inline uint32_t cs_sum16(const uint8_t *p, Py_ssize_t n, uint32_t acc) noexcept nogil:
    """Add the big-endian 16-bit words of p[0:n] to acc (odd tail zero-padded).

    Uses a 64-bit accumulator so that packets up to 64 KiB never overflow
    before the final fold.
    """
    cdef uint64_t s = acc
    cdef Py_ssize_t i = 0
    while i + 1 < n:
        s += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>p[i] << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint32_t>s


cdef inline uint32_t cs_sum_wide(const uint8_t *p, Py_ssize_t n, uint32_t acc) noexcept nogil:
    """cs_sum16, eight bytes a step: for whole segments (the TUN offload split).

    The ones' complement sum does not depend on byte order (RFC 1071), so
    native 64-bit words are added with end-around carry, folded to 16 bits
    and swapped to network order on a little-endian host; the tail (under 8
    bytes, at an even offset) goes through cs_sum16.
    """
    cdef uint64_t s = 0, w, t
    cdef uint16_t probe = 1
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        t = s + w
        s = t + <uint64_t>(t < w)  # t < w: it wrapped; t + 1 cannot wrap again
        i += 8
    s = (s & 0xFFFFFFFFULL) + (s >> 32)
    s = (s & 0xFFFFFFFFULL) + (s >> 32)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    if (<uint8_t *>&probe)[0] == 1:
        s = ((s & 0xFF) << 8) | (s >> 8)
    return cs_sum16(p + i, n - i, <uint32_t>s + acc)


cdef inline uint16_t cs_fold(uint32_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>s


cdef inline uint16_t cs_checksum(const uint8_t *p, Py_ssize_t n, uint32_t acc) noexcept nogil:
    """The value to store in a checksum field: ~(ones' complement sum)."""
    return <uint16_t>(~cs_fold(cs_sum16(p, n, acc)) & 0xFFFF)


cdef inline uint16_t cs_replace(uint16_t check, const uint8_t *old,
                                   const uint8_t *new, Py_ssize_t n) noexcept nogil:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over the n changed bytes (n even).

    Using the complement form avoids the -0/+0 ambiguity of eqn. 2.
    """
    cdef uint32_t s = (~check) & 0xFFFF
    cdef Py_ssize_t i = 0
    while i < n:
        s += (~((<uint32_t>old[i] << 8) | old[i + 1])) & 0xFFFF
        s += (<uint32_t>new[i] << 8) | new[i + 1]
        i += 2
    return <uint16_t>(~cs_fold(s) & 0xFFFF)
