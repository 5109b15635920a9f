# The overlay's wire format (prefix wire_): WireGuard's four messages, each a
# UDP datagram that starts with a 32-bit little-endian type (1 initiation,
# 2 response, 3 cookie reply, 4 transport data) whose upper three bytes are
# zero. The datapath handles transport data itself:
#
#   type (4) | receiver index (4, LE) | counter (8, LE) | ChaCha20-Poly1305 of
#   the packet zero-padded to a multiple of 16, then its 16-byte tag
#
# An empty packet is a keepalive. The handshake messages have fixed sizes and
# go to the control plane as they are (core/wireguard checks them).
#
# Our own signal travels inside the tunnel as an IP packet: a connector's
# reject of an unmapped transit IP is a packet of protocol WIRE_REJECT_PROTO
# (253, reserved for experiments by RFC 3692) from the connector's overlay
# address to the client's, whose payload is the address family (4 or 6) and
# the transit IP. Nothing on the wire is ours alone.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef enum:
    WG_INITIATION = 1
    WG_RESPONSE = 2
    WG_COOKIE = 3
    WG_TRANSPORT = 4
    WG_INITIATION_LEN = 148
    WG_RESPONSE_LEN = 92
    WG_COOKIE_LEN = 64
    WG_HDR = 16                 # a transport message's header
    WG_OVERHEAD = 32            # header + tag
    WG_PAD = 16
    WG_HANDSHAKE_MAX = 148
    WIRE_REJECT_PROTO = 253
    WIRE_REJECT_MAX = 40 + 1 + 16   # the longest reject packet (IPv6)


cdef inline uint32_t wire_le32(const uint8_t *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint64_t wire_le64(const uint8_t *p) noexcept nogil:
    return <uint64_t>wire_le32(p) | (<uint64_t>wire_le32(p + 4) << 32)


cdef inline void wire_put_le(uint8_t *p, uint64_t v, int n) noexcept nogil:
    cdef int i
    for i in range(n):
        p[i] = <uint8_t>(v >> (8 * i))


cdef inline int wire_type(const uint8_t *dg, Py_ssize_t n) noexcept nogil:
    """The type of a datagram of a well-formed size for it, else 0."""
    if n < 4 or dg[1] != 0 or dg[2] != 0 or dg[3] != 0:
        return 0
    if dg[0] == WG_TRANSPORT:
        return WG_TRANSPORT if n >= WG_OVERHEAD else 0
    if (dg[0] == WG_INITIATION and n == WG_INITIATION_LEN) or \
            (dg[0] == WG_RESPONSE and n == WG_RESPONSE_LEN) or \
            (dg[0] == WG_COOKIE and n == WG_COOKIE_LEN):
        return dg[0]
    return 0


cdef inline void wire_transport_header(uint8_t *dg, uint32_t receiver,
                                       uint64_t counter) noexcept nogil:
    wire_put_le(dg, WG_TRANSPORT, 4)
    wire_put_le(dg + 4, receiver, 4)
    wire_put_le(dg + 8, counter, 8)


cdef inline Py_ssize_t wire_padded(Py_ssize_t n) noexcept nogil:
    return (n + WG_PAD - 1) & ~(<Py_ssize_t>WG_PAD - 1)


cdef inline Py_ssize_t wire_ip_len(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """The length an IP packet says it has (padding after it is dropped), or
    -1 if it says more than there is or is no IP packet."""
    cdef Py_ssize_t want
    if n < 20:
        return -1
    if p[0] >> 4 == 4:
        want = (<Py_ssize_t>p[2] << 8) | p[3]
    elif p[0] >> 4 == 6 and n >= 40:
        want = 40 + ((<Py_ssize_t>p[4] << 8) | p[5])
    else:
        return -1
    return want if want <= n else -1


cdef inline Py_ssize_t wire_reject(uint8_t *p, uint8_t family, const uint8_t *src,
                                   const uint8_t *dst, const uint8_t *transit) noexcept nogil:
    """Write at p (WIRE_REJECT_MAX bytes free) a reject naming `transit`, an IP
    packet of `family` from src to dst (16-byte forms); its length."""
    cdef Py_ssize_t alen = 4 if family == 4 else 16
    cdef Py_ssize_t hlen = 20 if family == 4 else 40
    cdef Py_ssize_t n = hlen + 1 + alen
    cdef uint16_t sum
    memset(p, 0, hlen)
    if family == 4:
        p[0] = 0x45
        p[2] = <uint8_t>(n >> 8)
        p[3] = <uint8_t>n
        p[8] = 64
        p[9] = WIRE_REJECT_PROTO
        memcpy(p + 12, src, 4)
        memcpy(p + 16, dst, 4)
        sum = cs_checksum(p, 20, 0)
        p[10] = <uint8_t>(sum >> 8)
        p[11] = <uint8_t>sum
    else:
        p[0] = 0x60
        p[5] = <uint8_t>(1 + alen)
        p[6] = WIRE_REJECT_PROTO
        p[7] = 64
        memcpy(p + 8, src, 16)
        memcpy(p + 24, dst, 16)
    p[hlen] = family
    memcpy(p + hlen + 1, transit, alen)
    return n


cdef inline uint8_t wire_reject_transit(const uint8_t *p, Py_ssize_t n, uint8_t ip_family,
                                        uint8_t *transit16) noexcept nogil:
    """The family and transit IP (16-byte form) a reject packet names, 0 if
    it is not a well-formed one."""
    cdef Py_ssize_t hlen = 20 if ip_family == 4 else 40
    cdef uint8_t fam
    if n < hlen + 1:
        return 0
    fam = p[hlen]
    if (fam != 4 and fam != 6) or n != hlen + 1 + (4 if fam == 4 else 16):
        return 0
    memset(transit16, 0, 16)
    memcpy(transit16, p + hlen + 1, 4 if fam == 4 else 16)
    return fam
