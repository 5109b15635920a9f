# Python wrappers of the checksum primitives declared in checksum.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t


def ones_complement_sum(const uint8_t[::1] data not None, uint32_t initial=0) -> int:
    """Folded 16-bit ones' complement sum of ``data`` plus ``initial`` (RFC 1071)."""
    return cs_fold(cs_sum16(&data[0] if data.shape[0] else NULL, data.shape[0], initial))


def internet_checksum(const uint8_t[::1] data not None, uint32_t initial=0) -> int:
    """The checksum field value for ``data`` (``initial`` carries a pseudo-header sum)."""
    return cs_checksum(&data[0] if data.shape[0] else NULL, data.shape[0], initial)


def checksum_replace(uint16_t check, const uint8_t[::1] old not None,
                     const uint8_t[::1] new not None) -> int:
    """Update checksum ``check`` for a field that changed from ``old`` to ``new``.

    Both must be 4 bytes (an IPv4 address) or 16 bytes (an IPv6 address), or
    2 bytes (a port).
    """
    cdef Py_ssize_t n = old.shape[0]
    if n != new.shape[0] or n not in (2, 4, 16):
        raise ValueError(f"checksum_replace needs two fields of 2, 4 or 16 bytes, "
                         f"got {n} and {new.shape[0]}")
    return cs_replace(check, &old[0], &new[0], n)
