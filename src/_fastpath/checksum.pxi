# Internet checksum primitives (RFC 1071) and incremental update (RFC 1624).
#
# The C-level functions work on raw pointers so that the NAT code can fix a
# header in place; the def wrappers exist for Python callers and tests.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef inline uint32_t _sum16(const uint8_t *p, Py_ssize_t n, uint32_t acc) noexcept nogil:
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


cdef inline uint16_t _fold(uint32_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>s


cdef inline uint16_t _checksum(const uint8_t *p, Py_ssize_t n, uint32_t acc) noexcept nogil:
    """The value to store in a checksum field: ~(ones' complement sum)."""
    return <uint16_t>(~_fold(_sum16(p, n, acc)) & 0xFFFF)


cdef inline uint16_t _csum_replace(uint16_t check, const uint8_t *old,
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
    return <uint16_t>(~_fold(s) & 0xFFFF)


def ones_complement_sum(const uint8_t[::1] data not None, uint32_t initial=0) -> int:
    """Folded 16-bit ones' complement sum of ``data`` plus ``initial`` (RFC 1071)."""
    return _fold(_sum16(&data[0] if data.shape[0] else NULL, data.shape[0], initial))


def internet_checksum(const uint8_t[::1] data not None, uint32_t initial=0) -> int:
    """The checksum field value for ``data`` (``initial`` carries a pseudo-header sum)."""
    return _checksum(&data[0] if data.shape[0] else NULL, data.shape[0], initial)


def checksum_replace(uint16_t check, const uint8_t[::1] old not None,
                     const uint8_t[::1] new not None) -> int:
    """Update checksum ``check`` for a field that changed from ``old`` to ``new``.

    Both must be 4 bytes (an IPv4 address) or 16 bytes (an IPv6 address), or
    2 bytes (a port).
    """
    cdef Py_ssize_t n = old.shape[0]
    if n != new.shape[0] or n not in (2, 4, 16):
        raise ValueError(f"checksum_replace needs two fields of 2, 4 or 16 bytes, got {n} and {new.shape[0]}")
    return _csum_replace(check, &old[0], &new[0], n)
