# Packet parsing (prefix pk_): the IP header (v4 or v6, extension headers
# walked), the upper-layer header and, for ICMP errors, the packet quoted
# inside them.
#
# pk_pk_parse() fills a Parsed struct of offsets plus the 5-tuple as a FlowKey; the
# NAT and ICMP code work from those offsets without parsing again. Bounds
# checking is off in this build, so every read is preceded by an explicit
# length check against the packet's end: a packet never makes us read past n.
#
# Policy, per header (what the pumps can rely on):
# * IPv4: IHL >= 5, IHL*4 <= total length <= n (bytes after total length,
#   e.g. link padding, are ignored). Options are skipped. The header checksum
#   is not verified (the kernel that handed us the packet did, or the next
#   one will). Fragments: MF set or offset > 0. The first fragment is parsed
#   like a whole packet and must carry the whole minimal L4 header (RFC 1858:
#   a "tiny fragment" is MALFORMED); a later fragment has no L4 header, so it
#   gets kind PKT_FRAGMENT, ports 0 and the fragment id for fragment tracking.
# * IPv6: 40 + payload length <= n. Extension headers before the upper layer:
#   - hop-by-hop (0): skipped; allowed only right after the fixed header
#     (RFC 8200 4.1), elsewhere MALFORMED. Jumbograms are not supported (a
#     payload length of 0 just leaves nothing to parse).
#   - routing (43): skipped when segments-left is 0. With segments left the
#     upper-layer checksum uses the final destination inside the routing
#     header, not ip6.dst, so a rewrite of ip6.dst would break it: UNSUPPORTED.
#   - destination options (60): skipped.
#   - fragment (44): recorded (32-bit id, offset, M flag); a second one is
#     MALFORMED. Offset 0 continues the walk (RFC 7112: the whole header chain
#     is in the first fragment; a first fragment cut short is not OK either);
#     offset > 0 stops it, since the rest is a later slice of the payload. An
#     "atomic" fragment (offset 0, M clear) is a whole packet, not a fragment.
#   - anything else ends the chain and is the upper-layer protocol, including
#     AH (51), ESP (50) and no-next-header (59), which we do not look into
#     (kind PKT_OTHER; NAT would break AH anyway).
#   More than IP6_MAX_EXT extension headers: UNSUPPORTED.
# * TCP: 20 bytes and a data offset in [20, bytes available]; UDP: 8 bytes
#   and (whole packets) a length in [8, bytes available]; ICMP/ICMPv6: 8
#   bytes. ICMP in IPv6 or ICMPv6 in IPv4 is just an unknown protocol.
# * ICMP errors (v4 types 3, 11, 12; v6 types 1-4): the quoted packet is
#   parsed leniently, since it is truncated by design: its IP header (and v6
#   extension headers) must be complete within the quote, its total length is
#   not checked, and its ports need the first 8 bytes of its L4 header (RFC
#   792's minimum). A quote we cannot use leaves PKF_INNER clear; the outer
#   packet is still OK.

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef enum:  # pk_parse() status
    PARSE_OK = 0
    PARSE_TRUNCATED = 1     # shorter than its own headers say
    PARSE_MALFORMED = 2     # header fields that contradict each other or the RFCs
    PARSE_UNSUPPORTED = 3   # well formed, but not something we can translate safely

cdef enum:  # Parsed.kind / Parsed.inner_kind
    PKT_OTHER = 0           # an upper-layer protocol we do not look into; ports 0
    PKT_TCP = 1
    PKT_UDP = 2
    PKT_ECHO = 3            # ICMP/ICMPv6 echo request or reply; identifier as both ports
    PKT_ICMP_ERROR = 4      # ICMP/ICMPv6 error quoting a packet (outer ports 0)
    PKT_ICMP_OTHER = 5      # any other ICMP/ICMPv6 message; ports 0
    PKT_FRAGMENT = 6        # a non-first fragment: no L4 header, ports 0

cdef enum:  # Parsed.flags
    PKF_FRAG = 1            # the packet is a fragment (first or later)
    PKF_FRAG_FIRST = 2      # ... and it is the first one (offset 0): it has the L4 header
    PKF_INNER = 4           # ICMP error: the quoted packet was usable, inner fields valid

cdef enum:  # protocol numbers
    IPP_ICMP = 1
    IPP_TCP = 6
    IPP_UDP = 17
    IPP_ICMPV6 = 58
    IP6_HOPOPTS = 0
    IP6_ROUTING = 43
    IP6_FRAGMENT = 44
    IP6_DSTOPTS = 60
    IP6_MAX_EXT = 8


cdef struct Parsed:
    FlowKey key             # outer 5-tuple as parsed (rewrites change the bytes, not this)
    FlowKey inner           # PKF_INNER: the quoted packet's 5-tuple, as quoted (not reversed)
    uint32_t len            # the IP packet's own length (<= n)
    uint32_t l4_off         # offset of the upper-layer header (after any v6 extension headers)
    uint32_t csum_off       # offset of an L4 checksum covering a pseudo-header (TCP, UDP,
                            # ICMPv6) that the packet carries, 0 if none (ICMPv4, other
                            # protocols, later fragments)
    uint32_t frag_id        # PKF_FRAG: identification (IPv4 16 bits, IPv6 32 bits)
    uint32_t inner_off      # PKF_INNER: offset of the quoted IP header
    uint32_t inner_l4_off   # PKF_INNER: offset of the quoted L4 header, 0 if none (later fragment)
    uint32_t inner_csum_off # PKF_INNER: offset of the quoted L4 checksum covering a
                            # pseudo-header (UDP, TCP, ICMPv6) if it lies inside the quote, else 0
    uint8_t kind            # PKT_*
    uint8_t inner_kind      # PKF_INNER: PKT_* of the quoted packet
    uint8_t flags           # PKF_*
    uint8_t icmp_type       # outer ICMP/ICMPv6 type and code (0 for other kinds)
    uint8_t icmp_code


cdef inline uint16_t pk_rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t pk_rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void pk_wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>(v & 0xFF)


cdef inline void pk_wr32(uint8_t *p, uint32_t v) noexcept nogil:
    pk_wr16(p, <uint16_t>(v >> 16))
    pk_wr16(p + 2, <uint16_t>v)


cdef int pk_parse(const uint8_t *p, Py_ssize_t n, Parsed *out) noexcept nogil
cdef void pk_error_flow_key(const Parsed *pk, FlowKey *out) noexcept nogil

# Python side (tests, diagnostics, the def-level helpers): not per packet.
cdef int pk_parse_view(const uint8_t[::1] data, Parsed *pk) noexcept
cdef bytearray pk_parsed_copy(object data, Parsed *pk)
cdef str pk_status_name(int st)
