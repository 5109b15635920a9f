# Packet parsing; the policy per header and the types are in packet.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset


cdef struct _Walk6:
    uint32_t l4_off
    uint32_t frag_id
    uint16_t frag_offset    # bytes
    uint8_t proto
    uint8_t has_frag
    uint8_t more


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
            fo = pk_rd16(p + off + 2)
            w.has_frag = 1
            w.frag_offset = fo & 0xFFF8
            w.more = fo & 1
            w.frag_id = pk_rd32(p + off + 4)
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
        later = (pk_rd16(p + start + 6) & 0x1FFF) != 0
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
        k.sport = pk_rd16(p + il4)
        k.dport = pk_rd16(p + il4 + 2)
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
            k.sport = pk_rd16(p + il4 + 4)
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
        out.key.sport = pk_rd16(p + off)
        out.key.dport = pk_rd16(p + off + 2)
        out.csum_off = <uint32_t>(off + 16)
    elif proto == IPP_UDP:
        if avail < 8:
            return too_short
        if not frag:
            ulen = pk_rd16(p + off + 4)
            if ulen < 8 or ulen > avail:
                return PARSE_MALFORMED
        out.kind = PKT_UDP
        out.key.sport = pk_rd16(p + off)
        out.key.dport = pk_rd16(p + off + 2)
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
            out.key.sport = pk_rd16(p + off + 4)
            out.key.dport = out.key.sport
        elif _is_quoting_error(fam, out.icmp_type):
            out.kind = PKT_ICMP_ERROR
            _parse_inner(p, out)
        else:
            out.kind = PKT_ICMP_OTHER
    else:
        out.kind = PKT_OTHER
    return PARSE_OK


cdef int pk_parse(const uint8_t *p, Py_ssize_t n, Parsed *out) noexcept nogil:
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
        total = pk_rd16(p + 2)
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
        fo = pk_rd16(p + 6)
        if fo & 0x3FFF:  # MF or a non-zero offset
            out.flags = PKF_FRAG | (PKF_FRAG_FIRST if (fo & 0x1FFF) == 0 else 0)
            out.frag_id = pk_rd16(p + 4)
    elif (p[0] >> 4) == 6:
        if n < 40:
            return PARSE_TRUNCATED
        total = 40 + <Py_ssize_t>pk_rd16(p + 4)
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


cdef void pk_error_flow_key(const Parsed *pk, FlowKey *out) noexcept nogil:
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


# ---- the Python side, for tests and diagnostics (not per packet) ----

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


cdef int pk_parse_view(const uint8_t[::1] data, Parsed *pk) noexcept:
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        memset(pk, 0, sizeof(Parsed))
        return PARSE_TRUNCATED
    return pk_parse(&data[0], n, pk)


cdef str pk_status_name(int st):
    return _PARSE_STATUS_NAMES[st]


cdef bytearray pk_parsed_copy(object data, Parsed *pk):
    """A writable copy of the packet, parsed into pk; ValueError unless it parses OK."""
    cdef bytearray buf = bytearray(data)
    cdef uint8_t[::1] mv = buf
    cdef int st = pk_parse_view(mv, pk)
    if st != PARSE_OK:
        raise ValueError(f"packet does not parse: {_PARSE_STATUS_NAMES[st]}")
    return buf


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
    if pk_parse_view(data, &pk) != PARSE_OK:
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
        pk_error_flow_key(&pk, &rev)
        inner["flow_key"] = _key_dict(&rev)
        d["inner"] = inner
    return d
