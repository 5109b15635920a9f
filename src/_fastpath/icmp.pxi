# ICMP unreachable replies; the rules are in icmp.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset


cdef inline bint _is_any_icmp_error(const Parsed *pk) noexcept nogil:
    if pk.kind == PKT_ICMP_ERROR:
        return True
    if pk.kind != PKT_ICMP_OTHER:
        return False
    if pk.key.family == 4:
        return pk.icmp_type == 4 or pk.icmp_type == 5  # source quench, redirect
    return pk.icmp_type < 128  # RFC 4443 2.1: every type below 128 is an error


cdef inline bint _one_host(const uint8_t *a, uint8_t family, bint is_src) noexcept nogil:
    cdef int i
    if family == 4:
        # 0/8 "this network", 224/4 multicast, 240/4 reserved and broadcast; 127/8 as a source
        return a[0] != 0 and a[0] < 224 and not (is_src and a[0] == 127)
    if a[0] == 0xFF:
        return False
    for i in range(16):
        if a[i] != 0:
            return True
    return False


cdef Py_ssize_t icmp_build_unreachable(const uint8_t *p, const Parsed *pk, uint8_t *out,
                                       Py_ssize_t cap) noexcept nogil:
    """Write the unreachable reply to the packet p (parsed OK into pk) into out[0:cap].

    Returns its length, or 0 for "send nothing" (see above; also when cap cannot
    hold the minimal quote). out must not overlap p; UNREACH_BUF_SIZE always fits.
    """
    cdef uint8_t fam = pk.key.family
    cdef Py_ssize_t hdr = 28 if fam == 4 else 48  # IP header + ICMP header
    cdef Py_ssize_t limit = ICMP4_REPLY_MAX if fam == 4 else ICMP6_REPLY_MAX
    cdef Py_ssize_t q = pk.len
    cdef Py_ssize_t need = <Py_ssize_t>pk.l4_off + 8
    cdef uint8_t *icmp
    cdef uint32_t acc
    if pk.kind == PKT_FRAGMENT or _is_any_icmp_error(pk):
        return 0
    if not _one_host(pk.key.src, fam, True) or not _one_host(pk.key.dst, fam, False):
        return 0
    if q > limit - hdr:
        q = limit - hdr
    if q > cap - hdr:
        q = cap - hdr
    if need > pk.len:
        need = pk.len
    if q < need:
        return 0
    memset(out, 0, hdr)
    if fam == 4:
        out[0] = 0x45
        pk_wr16(out + 2, <uint16_t>(hdr + q))
        out[8] = 64
        out[9] = IPP_ICMP
        memcpy(out + 12, p + 16, 4)  # from the address the sender tried to reach
        memcpy(out + 16, p + 12, 4)
        pk_wr16(out + 10, cs_checksum(out, 20, 0))
        icmp = out + 20
        icmp[0] = 3
        icmp[1] = 1
        memcpy(icmp + 8, p, q)
        pk_wr16(icmp + 2, cs_checksum(icmp, 8 + q, 0))
    else:
        out[0] = 0x60
        pk_wr16(out + 4, <uint16_t>(8 + q))
        out[6] = IPP_ICMPV6
        out[7] = 64
        memcpy(out + 8, p + 24, 16)
        memcpy(out + 24, p + 8, 16)
        icmp = out + 40
        icmp[0] = 1
        icmp[1] = 3
        memcpy(icmp + 8, p, q)
        # pseudo-header: both addresses, the upper-layer length, the next header
        acc = cs_sum16(out + 8, 32, 0) + <uint32_t>(8 + q) + IPP_ICMPV6
        pk_wr16(icmp + 2, cs_checksum(icmp, 8 + q, acc))
    return hdr + q


def icmp_unreachable(data) -> bytes:
    """The host/address unreachable reply to an IP packet, or b"" when none is due.

    ValueError if the packet does not parse (the pump drops those silently).
    """
    cdef Parsed pk
    cdef bytearray src = pk_parsed_copy(data, &pk)
    cdef const uint8_t[::1] mv = src
    cdef uint8_t out[UNREACH_BUF_SIZE]
    cdef Py_ssize_t n = icmp_build_unreachable(&mv[0], &pk, out, UNREACH_BUF_SIZE)
    return (<const char *>out)[:n]
