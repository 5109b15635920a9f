# The overlay's wire format (prefix wire_): every UDP datagram between two
# nodes starts with a DG_HDR-byte header: the version (DG_VERSION), the type
# (data, reject, keepalive) and two reserved bytes (zero).
#
# * data: the header, then one IP packet.
# * reject: the header, then the address family (4 or 6) and the transit IP
#   (4 or 16 bytes) that the sender has no mapping for: "re-register it".
# * keepalive: the header alone.
#
# Anything else (another version, an unknown type, a reject of the wrong
# length) is a bad header and is dropped.

from libc.stdint cimport uint8_t
from libc.string cimport memcpy, memset


cdef enum:
    DG_VERSION = 1
    DG_DATA = 1
    DG_REJECT = 2
    DG_KEEPALIVE = 3
    DG_HDR = 4
    DG_REJECT_MAX = DG_HDR + 1 + 16     # the longest reject datagram


cdef inline void wire_header(uint8_t *dg, uint8_t dg_type) noexcept nogil:
    """Write the header of a datagram of dg_type at dg (DG_HDR bytes)."""
    dg[0] = DG_VERSION
    dg[1] = dg_type
    dg[2] = 0
    dg[3] = 0


cdef inline int wire_type(const uint8_t *dg, Py_ssize_t n) noexcept nogil:
    """The type of a datagram whose header (and reject payload) is well formed, else 0."""
    if n < DG_HDR or dg[0] != DG_VERSION:
        return 0
    if dg[1] == DG_DATA or dg[1] == DG_KEEPALIVE:
        return dg[1]
    if dg[1] == DG_REJECT and n > DG_HDR and (dg[DG_HDR] == 4 or dg[DG_HDR] == 6) \
            and n == DG_HDR + 1 + (4 if dg[DG_HDR] == 4 else 16):
        return DG_REJECT
    return 0


cdef inline Py_ssize_t wire_reject(uint8_t *dg, uint8_t family,
                                   const uint8_t *transit) noexcept nogil:
    """Write a reject naming `transit` (of `family`) at dg (DG_REJECT_MAX bytes
    free); its length."""
    cdef Py_ssize_t alen = 4 if family == 4 else 16
    wire_header(dg, DG_REJECT)
    dg[DG_HDR] = family
    memcpy(dg + DG_HDR + 1, transit, alen)
    return DG_HDR + 1 + alen


cdef inline uint8_t wire_reject_transit(const uint8_t *dg, Py_ssize_t n,
                                        uint8_t *transit16) noexcept nogil:
    """The family and transit IP (16-byte form) of a reject wire_type accepted."""
    memset(transit16, 0, 16)
    memcpy(transit16, dg + DG_HDR + 1, n - DG_HDR - 1)
    return dg[DG_HDR]
