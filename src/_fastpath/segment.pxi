# TUN offloads on reads: super-packets split, partial checksums completed; what the
# segments look like and why is in segment.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy


cdef int _sg_complete(const uint8_t *vh, uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Complete the partial checksum of a packet that is not GSO, in place."""
    cdef Py_ssize_t start = vnet_rd16(vh + 6), at = start + vnet_rd16(vh + 8)
    cdef uint16_t c
    if start >= n or at + 2 > n:
        return SG_E_HEADER
    # The field holds the pseudo-header's sum: it is part of what is summed.
    c = <uint16_t>(~cs_fold(cs_sum_wide(p + start, n - start, 0)) & 0xFFFF)
    pk_wr16(p + at, c if c != 0 else 0xFFFF)
    return SG_PLAIN


cdef int sg_parse(const uint8_t *vh, uint8_t *p, Py_ssize_t n, SgState *s) noexcept nogil:
    """Check the virtio-net header vh against the packet p (n bytes) read behind
    it: SG_PLAIN (p goes on as it is; a partial checksum was completed),
    SG_SPLIT (s is set up for sg_next), or SG_E_* (drop it)."""
    cdef uint8_t flags = vh[0]
    cdef uint8_t gtype = vh[1] & ~VNET_GSO_ECN
    cdef uint16_t gso_size = vnet_rd16(vh + 4)
    cdef bint partial = (flags & VNET_F_NEEDS_CSUM) != 0
    cdef Py_ssize_t l3, l4
    cdef uint8_t proto, want
    if flags & ~(VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID):
        return SG_E_HEADER
    if gtype == VNET_GSO_NONE:
        if vh[1] != VNET_GSO_NONE:
            return SG_E_HEADER
        return _sg_complete(vh, p, n) if partial else SG_PLAIN
    if gtype != VNET_GSO_TCPV4 and gtype != VNET_GSO_TCPV6 and gtype != VNET_GSO_UDP_L4:
        return SG_E_HEADER
    if gso_size == 0 or (gtype == VNET_GSO_UDP_L4 and vh[1] & VNET_GSO_ECN):
        return SG_E_HEADER
    if n < 20:
        return SG_E_PACKET
    if p[0] >> 4 == 4:
        if gtype == VNET_GSO_TCPV6:
            return SG_E_PACKET
        l3 = (p[0] & 0x0F) * 4
        # The whole datagram (not a fragment), exactly the bytes read.
        if l3 < 20 or pk_rd16(p + 2) != n or (pk_rd16(p + 6) & 0x3FFF) != 0:
            return SG_E_PACKET
        proto = p[9]
        s.family = 4
    elif p[0] >> 4 == 6:
        if gtype == VNET_GSO_TCPV4:
            return SG_E_PACKET
        if n < 40 or 40 + <Py_ssize_t>pk_rd16(p + 4) != n:
            return SG_E_PACKET
        l3 = 40
        proto = p[6]
        if proto == IP6_HOPOPTS or proto == IP6_ROUTING or proto == IP6_FRAGMENT \
                or proto == IP6_DSTOPTS:
            return SG_E_UNSUPPORTED
        s.family = 6
    else:
        return SG_E_PACKET
    want = IPP_UDP if gtype == VNET_GSO_UDP_L4 else IPP_TCP
    if proto != want:
        return SG_E_PACKET
    if want == IPP_TCP:
        if n < l3 + 20:
            return SG_E_PACKET
        l4 = (p[l3 + 12] >> 4) * 4
        if l4 < 20:
            return SG_E_PACKET
    else:
        l4 = 8
        if n < l3 + 8 or pk_rd16(p + l3 + 4) != n - l3:
            return SG_E_PACKET
    if l3 + l4 >= n:  # no payload to split (or headers longer than the packet)
        return SG_E_PACKET
    if partial and (vnet_rd16(vh + 6) != l3 or vnet_rd16(vh + 8) != (16 if want == IPP_TCP else 6)):
        return SG_E_HEADER
    s.p = p
    s.n = n
    s.l3len = <uint16_t>l3
    s.hlen = <uint16_t>(l3 + l4)
    # A gso_size beyond the payload makes one segment: the packet itself, completed.
    s.gso_size = <uint16_t>min(<Py_ssize_t>gso_size, n - l3 - l4)
    s.off = l3 + l4
    s.index = 0
    s.proto = proto
    s.seq = pk_rd32(p + l3 + 4) if proto == IPP_TCP else 0
    s.ip_id = pk_rd16(p + 4) if s.family == 4 else 0
    s.no_csum = proto == IPP_UDP and s.family == 4 and not partial and pk_rd16(p + l3 + 6) == 0
    return SG_SPLIT


cdef Py_ssize_t sg_next(SgState *s, uint8_t *out) noexcept nogil:
    """Write the next segment of s at out (room for sg_max_segment(s) bytes);
    its length, or 0 when every segment was written."""
    cdef Py_ssize_t chunk, seglen, l4len
    cdef uint8_t *t
    cdef uint32_t pseudo
    cdef uint16_t c
    cdef bint last
    if s.off >= s.n:
        return 0
    chunk = min(<Py_ssize_t>s.gso_size, s.n - s.off)
    last = s.off + chunk >= s.n
    seglen = s.hlen + chunk
    l4len = seglen - s.l3len
    memcpy(out, s.p, s.hlen)
    memcpy(out + s.hlen, s.p + s.off, chunk)
    if s.family == 4:
        pk_wr16(out + 2, <uint16_t>seglen)
        pk_wr16(out + 4, <uint16_t>(s.ip_id + s.index))
        out[10] = out[11] = 0
        pk_wr16(out + 10, cs_checksum(out, s.l3len, 0))
        pseudo = cs_sum16(out + 12, 8, 0)
    else:
        pk_wr16(out + 4, <uint16_t>l4len)
        pseudo = cs_sum16(out + 8, 32, 0)
    pseudo += s.proto + <uint32_t>l4len
    t = out + s.l3len
    if s.proto == IPP_TCP:
        pk_wr32(t + 4, s.seq + <uint32_t>(s.off - s.hlen))
        if not last:
            t[13] &= ~0x09  # FIN, PSH: the last segment's
        if s.index:
            t[13] &= ~0x80  # CWR: the first segment's
        t[16] = t[17] = 0
        pk_wr16(t + 16, <uint16_t>(~cs_fold(cs_sum_wide(t, l4len, pseudo)) & 0xFFFF))
    else:
        pk_wr16(t + 4, <uint16_t>l4len)
        if not s.no_csum:
            t[6] = t[7] = 0
            c = <uint16_t>(~cs_fold(cs_sum_wide(t, l4len, pseudo)) & 0xFFFF)
            pk_wr16(t + 6, c if c != 0 else 0xFFFF)
    s.off += chunk
    s.index += 1
    return seglen
