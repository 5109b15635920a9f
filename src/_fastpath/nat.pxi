# Address rewriting with incremental checksum updates (RFC 1624 via
# _csum_replace), translation of ICMP errors about a translated flow, and the
# fragment-tracking table that lets later fragments follow their first one.
#
# Which checksums an address covers:
# * IPv4 header checksum: both addresses. (IPv6 has none.)
# * TCP, UDP (both families) and ICMPv6: a pseudo-header with both addresses.
#   ICMPv4 has no pseudo-header. A UDP checksum of 0 means "none" on IPv4 and
#   stays 0; on IPv6 it is invalid, and we leave it so rather than invent one.
#   A UDP checksum that comes out as 0 is sent as 0xFFFF (RFC 768).
# * Later fragments carry no L4 header: only the IP header is rewritten. The
#   L4 checksum, which covers the whole datagram, is in the first fragment and
#   was fixed there; an incremental fix is exact for it although we never see
#   the rest of the datagram.
#
# ICMP errors. The quoted packet travels the opposite way to the error: an
# error on its way back to a client quotes the client's packet as it left.
# So a flow action "src old -> new" (SNAT), applied to an error travelling in
# that direction, rewrites the quoted packet's *dst* old -> new, and "dst old
# -> new" (DNAT) rewrites the quoted *src*. The outer address is rewritten
# too when it is the translated address itself (an error sent by the real
# server rather than a router on the path). Example, on a connector: a
# router's frag-needed about C->R is found by the key R->C (error_flow_key),
# whose action is "src R -> T"; the quote's dst R becomes T, the router stays
# the outer source. Every 16-bit field we touch in
# the quote (address, inner IPv4 header checksum, inner L4 checksum) sits at
# an even offset from the start of the ICMP message, so the outer ICMP
# checksum is fixed incrementally, word for word, as each of them changes.
#
# Parsed is the packet as parsed: these functions change the bytes, never
# pk.key / pk.inner, and they assume pk came from a PARSE_OK parse of p.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset


cdef enum:  # which address; the same values as flowtable.pxi's FT_REWRITE_SRC/DST
    NAT_SRC = 1
    NAT_DST = 2

cdef enum:
    FRAG_SLOTS = 1024       # power of two
    FRAG_PROBE = 8          # slots examined per insert/lookup (a full window evicts its oldest)


cdef inline Py_ssize_t _addr_off(uint8_t family, int which) noexcept nogil:
    """Offset of the source or destination address in an IP header of this family."""
    if family == 4:
        return 12 if which == NAT_SRC else 16
    return 8 if which == NAT_SRC else 24


cdef inline void _fix_csum(uint8_t *p, Py_ssize_t at, const uint8_t *old,
                           const uint8_t *new, Py_ssize_t n, bint udp) noexcept nogil:
    """Fix the checksum at p+at for a field changing from old to new (n bytes, even)."""
    cdef uint16_t c = _rd16(p + at)
    if udp and c == 0:
        return  # no checksum (IPv4), or an invalid one we leave alone (IPv6)
    c = _csum_replace(c, old, new, n)
    if udp and c == 0:
        c = 0xFFFF
    _wr16(p + at, c)


cdef inline void _set16_in_icmp(uint8_t *p, Py_ssize_t at, uint16_t v, Py_ssize_t icmp_csum) noexcept nogil:
    """Store v at p+at, a field inside an ICMP message whose checksum is at p+icmp_csum."""
    cdef uint8_t nv[2]
    _wr16(nv, v)
    _wr16(p + icmp_csum, _csum_replace(_rd16(p + icmp_csum), p + at, nv, 2))
    p[at] = nv[0]
    p[at + 1] = nv[1]


cdef void _rewrite_addr(uint8_t *p, const Parsed *pk, int which, const uint8_t *new_addr) noexcept nogil:
    cdef uint8_t fam = pk.key.family
    cdef Py_ssize_t a = _addr_off(fam, which)
    cdef Py_ssize_t alen = 4 if fam == 4 else 16
    if fam == 4:
        _fix_csum(p, 10, p + a, new_addr, 4, False)
    if pk.csum_off:
        _fix_csum(p, pk.csum_off, p + a, new_addr, alen, pk.kind == PKT_UDP)
    memcpy(p + a, new_addr, alen)


cdef void rewrite_src(uint8_t *p, Parsed *pk, const uint8_t *new_addr) noexcept nogil:
    """Set the outer source address (4 or 16 bytes, per pk.key.family), fixing checksums."""
    _rewrite_addr(p, pk, NAT_SRC, new_addr)


cdef void rewrite_dst(uint8_t *p, Parsed *pk, const uint8_t *new_addr) noexcept nogil:
    """Set the outer destination address, fixing checksums."""
    _rewrite_addr(p, pk, NAT_DST, new_addr)


cdef int rewrite_icmp_error(uint8_t *p, Parsed *pk, const uint8_t *inner_old,
                            const uint8_t *inner_new, int which_inner) noexcept nogil:
    """In an ICMP error, set the quoted packet's address which_inner (NAT_SRC/NAT_DST)
    from inner_old to inner_new. Fixes the quoted IPv4 header checksum, the quoted
    L4 checksum when the quote holds it (UDP always, TCP only beyond the minimal
    8 bytes, ICMPv6), and the outer ICMP checksum. The outer addresses are left
    alone. Returns 1, or 0 (nothing changed) if pk is not an error with a usable
    quote or the quoted address is not inner_old.
    """
    cdef uint8_t fam = pk.key.family
    cdef Py_ssize_t alen = 4 if fam == 4 else 16
    cdef Py_ssize_t outer_c = <Py_ssize_t>pk.l4_off + 2
    cdef Py_ssize_t a = <Py_ssize_t>pk.inner_off + _addr_off(fam, which_inner)
    cdef Py_ssize_t ic = pk.inner_csum_off
    cdef uint16_t c
    if pk.kind != PKT_ICMP_ERROR or not (pk.flags & PKF_INNER):
        return 0
    if memcmp(p + a, inner_old, alen) != 0:
        return 0
    if fam == 4:
        c = _csum_replace(_rd16(p + pk.inner_off + 10), p + a, inner_new, 4)
        _set16_in_icmp(p, pk.inner_off + 10, c, outer_c)
    if ic:
        c = _rd16(p + ic)
        if not (pk.inner_kind == PKT_UDP and c == 0):
            c = _csum_replace(c, p + a, inner_new, alen)
            if pk.inner_kind == PKT_UDP and c == 0:
                c = 0xFFFF
            _set16_in_icmp(p, ic, c, outer_c)
    _wr16(p + outer_c, _csum_replace(_rd16(p + outer_c), p + a, inner_new, alen))
    memcpy(p + a, inner_new, alen)
    return 1


cdef int nat_apply(uint8_t *p, Parsed *pk, int which, const uint8_t *new_addr) noexcept nogil:
    """Apply a flow's action for this packet's direction: address `which` becomes new_addr.

    Ordinary packets and later fragments: the outer address. ICMP errors, which the
    pump matched to the flow by their quoted packet's reversed 5-tuple: the quoted
    packet's opposite address (whose current value is the flow's old address), and
    the outer `which` address too if it holds that same old address. Returns 1 if
    translated, 0 for an ICMP error without a usable quote (nothing changed).
    """
    cdef uint8_t fam = pk.key.family
    cdef Py_ssize_t alen = 4 if fam == 4 else 16
    cdef int opposite = NAT_DST if which == NAT_SRC else NAT_SRC
    cdef uint8_t old[16]
    if pk.kind == PKT_ICMP_ERROR:
        if not (pk.flags & PKF_INNER):
            return 0
        memcpy(old, p + pk.inner_off + _addr_off(fam, opposite), alen)
        rewrite_icmp_error(p, pk, old, new_addr, opposite)
        if memcmp(p + _addr_off(fam, which), old, alen) == 0:
            _rewrite_addr(p, pk, which, new_addr)
        return 1
    _rewrite_addr(p, pk, which, new_addr)
    return 1


# ---- fragment tracking ----
#
# A later fragment has no ports, so it cannot be matched to a flow. When the
# pump translates a first fragment it remembers (family, src, dst, proto, id)
# -> (which, new address), keyed by the addresses as they arrived, and later
# fragments with the same key get the same rewrite. Fragments that arrive
# before their first one find nothing (the pump treats them as unknown).
# Entries are never deleted: one older than the table's timeout is ignored
# and reused. Open addressing over a fixed window of FRAG_PROBE slots; a full
# window evicts its oldest entry. One table per pump thread (no locking).
# Times are uint64 milliseconds of a monotonic clock, as in the flow table.

cdef struct FragKey:
    uint8_t src[16]
    uint8_t dst[16]
    uint32_t id
    uint8_t family
    uint8_t proto
    uint8_t _pad[2]         # zeroed: keys are compared with memcmp


cdef struct FragEntry:
    FragKey key
    uint64_t stamp          # ms
    uint8_t used
    uint8_t which
    uint8_t addr[16]


cdef struct FragTable:
    FragEntry slots[FRAG_SLOTS]
    uint64_t timeout_ms


cdef void frag_table_init(FragTable *t, uint64_t timeout_ms) noexcept nogil:
    """Empty the table; entries older than timeout_ms are ignored."""
    memset(t, 0, sizeof(FragTable))
    t.timeout_ms = timeout_ms


cdef inline void _frag_key(const Parsed *pk, FragKey *k) noexcept nogil:
    memset(k, 0, sizeof(FragKey))
    memcpy(k.src, pk.key.src, 16)
    memcpy(k.dst, pk.key.dst, 16)
    k.id = pk.frag_id
    k.family = pk.key.family
    k.proto = pk.key.proto


cdef inline uint32_t _frag_hash(const FragKey *k) noexcept nogil:
    cdef const uint8_t *b = <const uint8_t *>k
    cdef uint32_t h = 2166136261u  # FNV-1a
    cdef size_t i
    for i in range(sizeof(FragKey)):
        h = (h ^ b[i]) * 16777619u
    return h ^ (h >> 15)


cdef inline bint _frag_live(const FragTable *t, const FragEntry *e, uint64_t now) noexcept nogil:
    # A clock read a little behind the one that stored the entry still counts as live.
    return e.used != 0 and (now <= e.stamp or now - e.stamp <= t.timeout_ms)


cdef int frag_remember(FragTable *t, const Parsed *pk, int which, const uint8_t *new_addr,
                       uint64_t now) noexcept nogil:
    """After translating a first fragment, remember its rewrite for the later ones.

    Returns 1 if stored, 0 if pk is not a first fragment.
    """
    cdef FragKey k
    cdef FragEntry *e
    cdef FragEntry *victim = NULL
    cdef bint victim_live = False
    cdef uint32_t h
    cdef int i
    if (pk.flags & (PKF_FRAG | PKF_FRAG_FIRST)) != (PKF_FRAG | PKF_FRAG_FIRST):
        return 0
    _frag_key(pk, &k)
    h = _frag_hash(&k)
    for i in range(FRAG_PROBE):
        e = &t.slots[(h + <uint32_t>i) & (FRAG_SLOTS - 1)]
        if e.used and memcmp(&e.key, &k, sizeof(FragKey)) == 0:
            victim = e  # the same datagram again: refresh
            break
        # Reuse a free or expired slot first, else the oldest live one.
        if not _frag_live(t, e, now):
            if victim == NULL or victim_live:
                victim = e
                victim_live = False
        elif victim == NULL or (victim_live and e.stamp < victim.stamp):
            victim = e
            victim_live = True
    victim.key = k
    victim.stamp = now
    victim.used = 1
    victim.which = <uint8_t>which
    memset(victim.addr, 0, 16)
    memcpy(victim.addr, new_addr, 4 if pk.key.family == 4 else 16)
    return 1


cdef int frag_lookup(const FragTable *t, const Parsed *pk, uint64_t now, int *which,
                     uint8_t *new_addr) noexcept nogil:
    """For a later fragment: 1 and the rewrite (which, 16-byte new_addr) to apply, else 0."""
    cdef FragKey k
    cdef const FragEntry *e
    cdef uint32_t h
    cdef int i
    if pk.kind != PKT_FRAGMENT:
        return 0
    _frag_key(pk, &k)
    h = _frag_hash(&k)
    for i in range(FRAG_PROBE):
        e = &t.slots[(h + <uint32_t>i) & (FRAG_SLOTS - 1)]
        if _frag_live(t, e, now) and memcmp(&e.key, &k, sizeof(FragKey)) == 0:
            which[0] = e.which
            memcpy(new_addr, e.addr, 16)
            return 1
    return 0


# ---- def-level API, for tests and diagnostics ----

cdef int _which_arg(str which) except -1:
    if which == "src":
        return NAT_SRC
    if which == "dst":
        return NAT_DST
    raise ValueError(f"which must be 'src' or 'dst', got {which!r}")


cdef bytes _addr_arg(object addr, uint8_t family, str what):
    """An address argument (packed bytes or an ipaddress object) checked against the family."""
    cdef bytes b = bytes(addr.packed if hasattr(addr, "packed") else addr)
    if len(b) != (4 if family == 4 else 16):
        raise ValueError(f"{what}: an IPv{family} packet needs a {4 if family == 4 else 16}-byte "
                         f"address, got {len(b)} bytes")
    return b


cdef bytearray _parsed_copy(object data, Parsed *pk):
    """A writable copy of the packet, parsed into pk; ValueError unless it parses OK."""
    cdef bytearray buf = bytearray(data)
    cdef uint8_t[::1] mv = buf
    cdef int st = _parse_buffer(mv, pk)
    if st != PARSE_OK:
        raise ValueError(f"packet does not parse: {_PARSE_STATUS_NAMES[st]}")
    return buf


def nat_rewrite(data, str which, new_addr) -> bytes:
    """The packet with its outer source ('src') or destination ('dst') set to new_addr.

    Checksums are fixed incrementally; an ICMP error's quoted packet is left alone.
    """
    cdef Parsed pk
    cdef bytearray buf = _parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes a = _addr_arg(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    _rewrite_addr(&mv[0], &pk, w, a)
    return bytes(buf)


def nat_rewrite_icmp_inner(data, str which, old_addr, new_addr) -> bytes:
    """The ICMP error with its quoted packet's address `which` changed from old_addr to new_addr.

    ValueError if data is not an ICMP error with a usable quote holding old_addr there.
    """
    cdef Parsed pk
    cdef bytearray buf = _parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes old = _addr_arg(old_addr, pk.key.family, "old_addr")
    cdef bytes new = _addr_arg(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    if pk.kind != PKT_ICMP_ERROR or not (pk.flags & PKF_INNER):
        raise ValueError("not an ICMP error with a usable quoted packet")
    if not rewrite_icmp_error(&mv[0], &pk, old, new, w):
        raise ValueError(f"the quoted packet's {which} address is not {old_addr}")
    return bytes(buf)


def nat_translate(data, str which, new_addr) -> bytes | None:
    """Apply a flow action ("`which` address becomes new_addr") as the pumps do.

    For an ICMP error this rewrites its quoted packet's opposite address and the
    outer `which` address when it held the same old address. None for an ICMP
    error whose quote is unusable.
    """
    cdef Parsed pk
    cdef bytearray buf = _parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes new = _addr_arg(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    if not nat_apply(&mv[0], &pk, w, new):
        return None
    return bytes(buf)


cdef inline uint64_t _ms_arg(object now, str what) except? 0:
    if now < 0:
        raise ValueError(f"{what} must be >= 0 (ms), got {now!r}")
    return <uint64_t>now


cdef class FragTracker:
    """One fragment-tracking table, for tests (the pumps own theirs at C level).

    FragTracker(timeout_ms=30_000); every `now` is milliseconds of a monotonic clock.
    """

    cdef FragTable *t

    def __cinit__(self, timeout_ms: int = 30_000) -> None:
        self.t = <FragTable *>calloc(1, sizeof(FragTable))
        if self.t == NULL:
            raise MemoryError("FragTracker: cannot allocate its table")
        frag_table_init(self.t, _ms_arg(timeout_ms, "timeout_ms"))

    def __dealloc__(self) -> None:
        free(self.t)

    def remember(self, first_fragment, str which, new_addr, now) -> bool:
        """Record the rewrite applied to a first fragment; False if it is not one."""
        cdef Parsed pk
        _parsed_copy(first_fragment, &pk)
        cdef int w = _which_arg(which)
        cdef bytes a = _addr_arg(new_addr, pk.key.family, "new_addr")
        return bool(frag_remember(self.t, &pk, w, a, _ms_arg(now, "now")))

    def lookup(self, fragment, now) -> tuple | None:
        """('src'|'dst', packed new address) for a later fragment of a remembered one, else None."""
        cdef Parsed pk
        cdef int w = 0
        cdef uint8_t addr[16]
        _parsed_copy(fragment, &pk)
        if not frag_lookup(self.t, &pk, _ms_arg(now, "now"), &w, addr):
            return None
        return ("src" if w == NAT_SRC else "dst",
                (<const char *>addr)[:4 if pk.key.family == 4 else 16])

    def translate(self, fragment, now) -> bytes | None:
        """A later fragment rewritten as its first one was, or None if unknown."""
        cdef Parsed pk
        cdef int w = 0
        cdef uint8_t addr[16]
        cdef bytearray buf = _parsed_copy(fragment, &pk)
        cdef uint8_t[::1] mv = buf
        if not frag_lookup(self.t, &pk, _ms_arg(now, "now"), &w, addr):
            return None
        _rewrite_addr(&mv[0], &pk, w, addr)
        return bytes(buf)
