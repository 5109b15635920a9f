# Internet checksum primitives (RFC 1071) and incremental update (RFC 1624).
#
# Prefix cs_. Inline: the NAT code fixes headers in place with them, per
# packet. The def wrappers (checksum.pxi) exist for Python callers and tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


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
