# Packet parsing: the IP header (v4 or v6, extension headers walked), the
# upper-layer header and, for ICMP errors, the packet quoted inside them.
#
# parse() fills a Parsed struct of offsets plus the 5-tuple as a FlowKey; the
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
from libc.string cimport memcpy, memset


cdef enum:  # parse() status
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

cdef enum:  # protocol numbers (prefixed to stay clear of other include files)
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


cdef struct _Walk6:
    uint32_t l4_off
    uint32_t frag_id
    uint16_t frag_offset    # bytes
    uint8_t proto
    uint8_t has_frag
    uint8_t more


cdef inline uint16_t _rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>(v & 0xFF)


cdef int _walk6(const uint8_t *p, Py_ssize_t base, Py_ssize_t end, _Walk6 *w) noexcept nogil:
    """Walk the extension headers of the IPv6 header at p+base (40 bytes there already checked).

    Offsets in w are absolute (from p). See the policy at the top of the file.
    """
    cdef Py_ssize_t off = base + 40
    cdef Py_ssize_t hl
    cdef uint8_t nh = p[base + 6]
    cdef uint16_t fo
    cdef int count = 0
    memset(w, 0, sizeof(_Walk6))
    while True:
        if nh == IP6_HOPOPTS or nh == IP6_ROUTING or nh == IP6_DSTOPTS:
            if nh == IP6_HOPOPTS and off != base + 40:
                return PARSE_MALFORMED
            if off + 8 > end:
                return PARSE_TRUNCATED
            hl = (<Py_ssize_t>p[off + 1] + 1) * 8
            if off + hl > end:
                return PARSE_TRUNCATED
            if nh == IP6_ROUTING and p[off + 3] != 0:
                return PARSE_UNSUPPORTED
            nh = p[off]
            off += hl
        elif nh == IP6_FRAGMENT:
            if w.has_frag:
                return PARSE_MALFORMED
            if off + 8 > end:
                return PARSE_TRUNCATED
            fo = _rd16(p + off + 2)
            w.has_frag = 1
            w.frag_offset = fo & 0xFFF8
            w.more = fo & 1
            w.frag_id = _rd32(p + off + 4)
            nh = p[off]
            off += 8
            if w.frag_offset:
                break
        else:
            break
        count += 1
        if count > IP6_MAX_EXT:
            return PARSE_UNSUPPORTED
    w.proto = nh
    w.l4_off = <uint32_t>off
    return PARSE_OK


cdef inline bint _is_icmp_proto(uint8_t family, uint8_t proto) noexcept nogil:
    return (family == 4 and proto == IPP_ICMP) or (family == 6 and proto == IPP_ICMPV6)


cdef inline bint _is_echo(uint8_t family, uint8_t t) noexcept nogil:
    if family == 4:
        return t == 0 or t == 8
    return t == 128 or t == 129


cdef inline bint _is_quoting_error(uint8_t family, uint8_t t) noexcept nogil:
    """An ICMP error type whose body quotes the offending packet (the ones we translate)."""
    if family == 4:
        return t == 3 or t == 11 or t == 12
    return 1 <= t <= 4


cdef void _parse_inner(const uint8_t *p, Parsed *out) noexcept nogil:
    """Parse the packet quoted in the ICMP error at out.l4_off; sets PKF_INNER if usable."""
    cdef Py_ssize_t start = <Py_ssize_t>out.l4_off + 8
    cdef Py_ssize_t end = out.len
    cdef Py_ssize_t ihl, il4, la
    cdef uint8_t fam = out.key.family
    cdef uint8_t proto, t
    cdef bint later
    cdef _Walk6 w
    cdef FlowKey *k = &out.inner
    if fam == 4:
        if end - start < 20 or (p[start] >> 4) != 4:
            return
        ihl = (p[start] & 0x0F) * 4
        if ihl < 20 or start + ihl > end:
            return
        memcpy(k.src, p + start + 12, 4)
        memcpy(k.dst, p + start + 16, 4)
        proto = p[start + 9]
        later = (_rd16(p + start + 6) & 0x1FFF) != 0
        il4 = start + ihl
    else:
        if end - start < 40 or (p[start] >> 4) != 6:
            return
        if _walk6(p, start, end, &w) != PARSE_OK:
            return
        memcpy(k.src, p + start + 8, 16)
        memcpy(k.dst, p + start + 24, 16)
        proto = w.proto
        later = w.has_frag and w.frag_offset != 0
        il4 = w.l4_off
    k.family = fam
    k.proto = proto
    out.inner_off = <uint32_t>start
    if later:
        out.inner_kind = PKT_FRAGMENT
        out.flags |= PKF_INNER
        return
    la = end - il4
    if proto == IPP_TCP or proto == IPP_UDP:
        if la < 8:
            return
        k.sport = _rd16(p + il4)
        k.dport = _rd16(p + il4 + 2)
        if proto == IPP_UDP:
            out.inner_kind = PKT_UDP
            out.inner_csum_off = <uint32_t>(il4 + 6)
        else:
            out.inner_kind = PKT_TCP
            # TCP's checksum sits at byte 16, outside the 8 bytes RFC 792 promises;
            # routers that quote more (Linux quotes up to 576/1280) include it.
            if la >= 18:
                out.inner_csum_off = <uint32_t>(il4 + 16)
    elif _is_icmp_proto(fam, proto):
        if la < 8:
            return
        t = p[il4]
        if _is_echo(fam, t):
            out.inner_kind = PKT_ECHO
            k.sport = _rd16(p + il4 + 4)
            k.dport = k.sport
        elif _is_quoting_error(fam, t):
            out.inner_kind = PKT_ICMP_ERROR  # an error about an error: not descended into
        else:
            out.inner_kind = PKT_ICMP_OTHER
        if fam == 6:
            out.inner_csum_off = <uint32_t>(il4 + 2)
    else:
        out.inner_kind = PKT_OTHER
    out.inner_l4_off = <uint32_t>il4
    out.flags |= PKF_INNER


cdef int _parse_l4(const uint8_t *p, Parsed *out) noexcept nogil:
    cdef Py_ssize_t off = out.l4_off
    cdef Py_ssize_t avail = <Py_ssize_t>out.len - off
    cdef Py_ssize_t doff, ulen
    cdef uint8_t fam = out.key.family
    cdef uint8_t proto = out.key.proto
    cdef bint frag = (out.flags & PKF_FRAG) != 0
    # A first fragment too short for its L4 header is a tiny-fragment attack, not truncation.
    cdef int too_short = PARSE_MALFORMED if frag else PARSE_TRUNCATED
    if frag and not (out.flags & PKF_FRAG_FIRST):
        out.kind = PKT_FRAGMENT
        return PARSE_OK
    if proto == IPP_TCP:
        if avail < 20:
            return too_short
        doff = (p[off + 12] >> 4) * 4
        if doff < 20:
            return PARSE_MALFORMED
        if doff > avail:
            return too_short
        out.kind = PKT_TCP
        out.key.sport = _rd16(p + off)
        out.key.dport = _rd16(p + off + 2)
        out.csum_off = <uint32_t>(off + 16)
    elif proto == IPP_UDP:
        if avail < 8:
            return too_short
        if not frag:
            ulen = _rd16(p + off + 4)
            if ulen < 8 or ulen > avail:
                return PARSE_MALFORMED
        out.kind = PKT_UDP
        out.key.sport = _rd16(p + off)
        out.key.dport = _rd16(p + off + 2)
        out.csum_off = <uint32_t>(off + 6)
    elif _is_icmp_proto(fam, proto):
        if avail < 8:
            return too_short
        out.icmp_type = p[off]
        out.icmp_code = p[off + 1]
        if fam == 6:
            out.csum_off = <uint32_t>(off + 2)
        if _is_echo(fam, out.icmp_type):
            out.kind = PKT_ECHO
            out.key.sport = _rd16(p + off + 4)
            out.key.dport = out.key.sport
        elif _is_quoting_error(fam, out.icmp_type):
            out.kind = PKT_ICMP_ERROR
            _parse_inner(p, out)
        else:
            out.kind = PKT_ICMP_OTHER
    else:
        out.kind = PKT_OTHER
    return PARSE_OK


cdef int parse(const uint8_t *p, Py_ssize_t n, Parsed *out) noexcept nogil:
    """Parse the IP packet p[0:n] into *out; PARSE_OK or why not (out is then partial).

    out is fully zeroed first, so FlowKey padding is stable for hashing.
    """
    cdef Py_ssize_t ihl, total
    cdef uint16_t fo
    cdef int st
    cdef _Walk6 w
    memset(out, 0, sizeof(Parsed))
    if n < 1:
        return PARSE_TRUNCATED
    if (p[0] >> 4) == 4:
        if n < 20:
            return PARSE_TRUNCATED
        ihl = (p[0] & 0x0F) * 4
        total = _rd16(p + 2)
        if ihl < 20 or total < ihl:
            return PARSE_MALFORMED
        if total > n:
            return PARSE_TRUNCATED
        out.key.family = 4
        out.key.proto = p[9]
        memcpy(out.key.src, p + 12, 4)
        memcpy(out.key.dst, p + 16, 4)
        out.len = <uint32_t>total
        out.l4_off = <uint32_t>ihl
        fo = _rd16(p + 6)
        if fo & 0x3FFF:  # MF or a non-zero offset
            out.flags = PKF_FRAG | (PKF_FRAG_FIRST if (fo & 0x1FFF) == 0 else 0)
            out.frag_id = _rd16(p + 4)
    elif (p[0] >> 4) == 6:
        if n < 40:
            return PARSE_TRUNCATED
        total = 40 + <Py_ssize_t>_rd16(p + 4)
        if total > n:
            return PARSE_TRUNCATED
        st = _walk6(p, 0, total, &w)
        if st != PARSE_OK:
            return st
        out.key.family = 6
        out.key.proto = w.proto
        memcpy(out.key.src, p + 8, 16)
        memcpy(out.key.dst, p + 24, 16)
        out.len = <uint32_t>total
        out.l4_off = w.l4_off
        if w.has_frag and (w.frag_offset != 0 or w.more):
            out.flags = PKF_FRAG | (PKF_FRAG_FIRST if w.frag_offset == 0 else 0)
            out.frag_id = w.frag_id
    else:
        return PARSE_MALFORMED
    return _parse_l4(p, out)


cdef void error_flow_key(const Parsed *pk, FlowKey *out) noexcept nogil:
    """For an ICMP error with PKF_INNER: the key to find its flow with.

    The quoted packet went the other way, so its 5-tuple reversed is the key of
    the packets that travel the way the error does (apply that direction's action
    with nat_apply).
    """
    memset(out, 0, sizeof(FlowKey))
    memcpy(out.src, pk.inner.dst, 16)
    memcpy(out.dst, pk.inner.src, 16)
    out.sport = pk.inner.dport
    out.dport = pk.inner.sport
    out.family = pk.inner.family
    out.proto = pk.inner.proto


# ---- def-level view, for tests and diagnostics (not per packet) ----

_PARSE_STATUS_NAMES = {PARSE_OK: "ok", PARSE_TRUNCATED: "truncated",
                       PARSE_MALFORMED: "malformed", PARSE_UNSUPPORTED: "unsupported"}
_KIND_NAMES = {PKT_OTHER: "other", PKT_TCP: "tcp", PKT_UDP: "udp", PKT_ECHO: "echo",
               PKT_ICMP_ERROR: "icmp_error", PKT_ICMP_OTHER: "icmp_other",
               PKT_FRAGMENT: "fragment"}


cdef object _key_dict(const FlowKey *k):
    import ipaddress
    cdef Py_ssize_t alen = 4 if k.family == 4 else 16
    return {
        "family": k.family,
        "proto": k.proto,
        "src": ipaddress.ip_address((<const char *>k.src)[:alen]),
        "dst": ipaddress.ip_address((<const char *>k.dst)[:alen]),
        "sport": k.sport,
        "dport": k.dport,
    }


cdef int _parse_buffer(const uint8_t[::1] data, Parsed *pk) noexcept:
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        memset(pk, 0, sizeof(Parsed))
        return PARSE_TRUNCATED
    return parse(&data[0], n, pk)


def parse_status(const uint8_t[::1] data not None) -> str:
    """Why a packet would be dropped: 'ok', 'truncated', 'malformed' or 'unsupported'."""
    cdef Parsed pk
    return _PARSE_STATUS_NAMES[_parse_buffer(data, &pk)]


def parse_packet(const uint8_t[::1] data not None) -> dict | None:
    """The parse of one IP packet as a dict, or None unless its status is 'ok'.

    Keys: the outer 5-tuple (family, proto, src, dst, sport, dport as in FlowKey),
    kind, length, l4_offset, checksum_offset (0: none to fix), icmp_type/icmp_code,
    fragment (None or {id, first}) and inner (None or the quoted packet's 5-tuple
    plus kind, offset, l4_offset, checksum_offset and flow_key, the reversed
    5-tuple that finds the error's flow).
    """
    cdef Parsed pk
    cdef FlowKey rev
    if _parse_buffer(data, &pk) != PARSE_OK:
        return None
    d = _key_dict(&pk.key)
    d.update(
        kind=_KIND_NAMES[pk.kind],
        length=pk.len,
        l4_offset=pk.l4_off,
        checksum_offset=pk.csum_off,
        icmp_type=pk.icmp_type,
        icmp_code=pk.icmp_code,
        fragment=None,
        inner=None,
    )
    if pk.flags & PKF_FRAG:
        d["fragment"] = {"id": pk.frag_id, "first": bool(pk.flags & PKF_FRAG_FIRST)}
    if pk.flags & PKF_INNER:
        inner = _key_dict(&pk.inner)
        inner.update(kind=_KIND_NAMES[pk.inner_kind], offset=pk.inner_off,
                     l4_offset=pk.inner_l4_off, checksum_offset=pk.inner_csum_off)
        error_flow_key(&pk, &rev)
        inner["flow_key"] = _key_dict(&rev)
        d["inner"] = inner
    return d
