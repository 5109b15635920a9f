# Software GRO into the TUN device; what is joined and why is in coalesce.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport write


cdef int co_init(CoBuf *b) noexcept nogil:
    memset(b, 0, sizeof(CoBuf))
    b.buf = <uint8_t *>malloc(VNET_HDR + 65536)
    return 0 if b.buf != NULL else -1


cdef void co_free(CoBuf *b) noexcept nogil:
    free(b.buf)
    b.buf = NULL


cdef inline bint _co_write(int tun_fd, uint64_t *counters, const uint8_t *p,
                           Py_ssize_t n) noexcept nogil:
    if write(tun_fd, p, n) < 0:
        counters[C_TUN_WRITE_ERRORS] += 1
        return False
    return True


cdef bint co_write_plain(int tun_fd, uint64_t *counters, const uint8_t *p,
                         Py_ssize_t n, bint vnet) noexcept nogil:
    """Write one packet p as it is: with `vnet`, behind a zero virtio-net header,
    for which p must have VNET_HDR writable bytes in front of it (the datagram's
    header room)."""
    cdef uint8_t *h = <uint8_t *>p
    if vnet:
        h -= VNET_HDR
        memset(h, 0, VNET_HDR)
    if not _co_write(tun_fd, counters, h, n + (VNET_HDR if vnet else 0)):
        return False
    counters[C_TUN_TX] += 1
    return True


cdef inline int _co_geometry(const uint8_t *p, Py_ssize_t n, uint16_t *l3, uint16_t *l4,
                             Py_ssize_t *payload) noexcept nogil:
    """The family (4, 6) of a TCP segment that may be joined, with its header
    lengths and payload; 0 for any other packet."""
    cdef const uint8_t *t
    cdef int family
    cdef uint8_t flags
    if n < 40:
        return 0
    if p[0] == 0x45:
        # Whole (offset 0, no MF), DF set: the kernel's TCPv4 GSO keeps DF on every piece.
        if p[9] != IPP_TCP or pk_rd16(p + 2) != n or pk_rd16(p + 6) != 0x4000:
            return 0
        l3[0] = 20
        family = 4
    elif p[0] >> 4 == 6:
        if n < 60 or p[6] != IPP_TCP or 40 + <Py_ssize_t>pk_rd16(p + 4) != n:
            return 0
        l3[0] = 40
        family = 6
    else:
        return 0
    t = p + l3[0]
    l4[0] = (t[12] >> 4) * 4
    if l4[0] < 20 or l3[0] + l4[0] >= n:
        return 0
    flags = t[13]
    if (flags & ~0x08) != 0x10:  # ACK, perhaps PSH; nothing else
        return 0
    payload[0] = n - l3[0] - l4[0]
    return family


cdef inline bint _co_joins(CoBuf *b, const uint8_t *p, int family, uint16_t l3, uint16_t l4,
                           Py_ssize_t payload) noexcept nogil:
    """Whether segment p continues the pending super-packet."""
    cdef const uint8_t *q = b.buf + VNET_HDR
    cdef const uint8_t *t = p + l3
    cdef const uint8_t *u = q + l3
    if (b.len == 0 or b.closed or family != b.family or l3 != b.l3len or l4 != b.l4len
            or payload > b.mss or b.nseg >= CO_SEGS
            or b.len - l3 - l4 + payload > CO_MAX_PAYLOAD):
        return False
    if family == 4:
        # TOS, TTL, protocol and addresses.
        if p[1] != q[1] or p[8] != q[8] or memcmp(p + 12, q + 12, 8) != 0:
            return False
    elif memcmp(p, q, 4) != 0 or p[7] != q[7] or memcmp(p + 8, q + 8, 32) != 0:
        return False
    # Ports, the sequence number where the last segment ended, ack, window, options.
    return (memcmp(t, u, 4) == 0 and pk_rd32(t + 4) == b.next_seq
            and memcmp(t + 8, u + 8, 4) == 0 and memcmp(t + 14, u + 14, 2) == 0
            and memcmp(t + 20, u + 20, l4 - 20) == 0)


cdef bint co_push(CoBuf *b, int tun_fd, uint64_t *counters, const uint8_t *p,
                  Py_ssize_t n) noexcept nogil:
    """A packet for the TUN device: joined to the pending super-packet, kept as
    the start of a new one, or (not TCP that may be joined) written after what
    was pending. p must have VNET_HDR writable bytes in front of it."""
    cdef uint16_t l3, l4
    cdef Py_ssize_t payload
    cdef int family = _co_geometry(p, n, &l3, &l4, &payload)
    cdef uint8_t *q = b.buf + VNET_HDR
    cdef bint psh
    if family == 0:
        co_flush(b, tun_fd, counters)
        return co_write_plain(tun_fd, counters, p, n, True)
    psh = (p[l3 + 13] & 0x08) != 0
    if _co_joins(b, p, family, l3, l4, payload):
        memcpy(q + b.len, p + l3 + l4, payload)
        b.len += payload
        b.nseg += 1
        b.next_seq += <uint32_t>payload
        if psh:
            q[l3 + 13] |= 0x08
        b.closed = psh or payload < b.mss
        return True
    co_flush(b, tun_fd, counters)
    if psh:  # it would end a super-packet of one at once
        return co_write_plain(tun_fd, counters, p, n, True)
    memcpy(q, p, n)
    b.len = n
    b.nseg = 1
    b.family = <uint8_t>family
    b.l3len = l3
    b.l4len = l4
    b.mss = <uint16_t>payload
    b.next_seq = pk_rd32(p + l3 + 4) + <uint32_t>payload
    b.closed = False
    return True


cdef void co_flush(CoBuf *b, int tun_fd, uint64_t *counters) noexcept nogil:
    """Write what is pending: a lone segment as it is, several as one GSO
    super-packet with a partial checksum."""
    cdef uint8_t *h = b.buf
    cdef uint8_t *q = b.buf + VNET_HDR
    cdef uint32_t s
    cdef Py_ssize_t tcplen
    cdef int alen
    if b.len == 0:
        return
    memset(h, 0, VNET_HDR)
    if b.nseg > 1:
        tcplen = b.len - b.l3len
        if b.family == 4:
            pk_wr16(q + 2, <uint16_t>b.len)
            q[10] = q[11] = 0
            pk_wr16(q + 10, cs_checksum(q, 20, 0))
            alen = 4
            s = cs_sum16(q + 12, 8, 0)
        else:
            pk_wr16(q + 4, <uint16_t>tcplen)
            alen = 16
            s = cs_sum16(q + 8, 32, 0)
        # The checksum field holds the pseudo-header's sum; the kernel adds the rest.
        s += IPP_TCP + <uint32_t>tcplen
        pk_wr16(q + b.l3len + 16, cs_fold(s))
        h[0] = VNET_F_NEEDS_CSUM
        h[1] = VNET_GSO_TCPV4 if b.family == 4 else VNET_GSO_TCPV6
        vnet_wr16(h + 2, b.l3len + b.l4len)
        vnet_wr16(h + 4, b.mss)
        vnet_wr16(h + 6, b.l3len)
        vnet_wr16(h + 8, 16)
    if _co_write(tun_fd, counters, h, VNET_HDR + b.len):
        counters[C_TUN_TX] += b.nseg
        if b.nseg > 1:
            counters[C_TUN_TX_COALESCED] += b.nseg
            counters[C_TUN_SUPER_PACKETS] += 1
    b.len = 0
    b.nseg = 0
