# NAT and fragment tracking; what they do and the types are in nat.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset


cdef inline Py_ssize_t _addr_off(uint8_t family, int which) noexcept nogil:
    """Offset of the source or destination address in an IP header of this family."""
    if family == 4:
        return 12 if which == NAT_SRC else 16
    return 8 if which == NAT_SRC else 24


cdef inline void _fix_csum(uint8_t *p, Py_ssize_t at, const uint8_t *old,
                           const uint8_t *new, Py_ssize_t n, bint udp) noexcept nogil:
    """Fix the checksum at p+at for a field changing from old to new (n bytes, even)."""
    cdef uint16_t c = pk_rd16(p + at)
    if udp and c == 0:
        return  # no checksum (IPv4), or an invalid one we leave alone (IPv6)
    c = cs_replace(c, old, new, n)
    if udp and c == 0:
        c = 0xFFFF
    pk_wr16(p + at, c)


cdef inline void _set16_in_icmp(uint8_t *p, Py_ssize_t at, uint16_t v,
                                Py_ssize_t icmp_csum) noexcept nogil:
    """Store v at p+at, a field inside an ICMP message whose checksum is at p+icmp_csum."""
    cdef uint8_t nv[2]
    pk_wr16(nv, v)
    pk_wr16(p + icmp_csum, cs_replace(pk_rd16(p + icmp_csum), p + at, nv, 2))
    p[at] = nv[0]
    p[at + 1] = nv[1]


cdef void nat_rewrite_addr(uint8_t *p, const Parsed *pk, int which,
                           const uint8_t *new_addr) noexcept nogil:
    """Set the outer address `which` (NAT_SRC/NAT_DST) to new_addr (4 or 16 bytes, per
    pk.key.family), fixing checksums; an ICMP error's quoted packet is left alone."""
    cdef uint8_t fam = pk.key.family
    cdef Py_ssize_t a = _addr_off(fam, which)
    cdef Py_ssize_t alen = 4 if fam == 4 else 16
    if fam == 4:
        _fix_csum(p, 10, p + a, new_addr, 4, False)
    if pk.csum_off:
        _fix_csum(p, pk.csum_off, p + a, new_addr, alen, pk.kind == PKT_UDP)
    memcpy(p + a, new_addr, alen)


cdef int nat_rewrite_icmp_error(uint8_t *p, Parsed *pk, const uint8_t *inner_old,
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
        c = cs_replace(pk_rd16(p + pk.inner_off + 10), p + a, inner_new, 4)
        _set16_in_icmp(p, pk.inner_off + 10, c, outer_c)
    if ic:
        c = pk_rd16(p + ic)
        if not (pk.inner_kind == PKT_UDP and c == 0):
            c = cs_replace(c, p + a, inner_new, alen)
            if pk.inner_kind == PKT_UDP and c == 0:
                c = 0xFFFF
            _set16_in_icmp(p, ic, c, outer_c)
    pk_wr16(p + outer_c, cs_replace(pk_rd16(p + outer_c), p + a, inner_new, alen))
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
        nat_rewrite_icmp_error(p, pk, old, new_addr, opposite)
        if memcmp(p + _addr_off(fam, which), old, alen) == 0:
            nat_rewrite_addr(p, pk, which, new_addr)
        return 1
    nat_rewrite_addr(p, pk, which, new_addr)
    return 1


cdef void nat_frag_init(FragTable *t, uint64_t timeout_ms) noexcept nogil:
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


cdef int nat_frag_remember(FragTable *t, const Parsed *pk, int which, const uint8_t *new_addr,
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


cdef int nat_frag_lookup(const FragTable *t, const Parsed *pk, uint64_t now, int *which,
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
