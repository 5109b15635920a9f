# The mapping tables; what they hold and their types are in tables.pxd.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.math cimport INFINITY
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset

from includes.pthread cimport (
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
)


# ---- open-addressing map (lock held) ----------------------------------------

# One half of a map: the same code for both slot sizes.
ctypedef fused TbHalf:
    TbHalf4
    TbHalf6


cdef inline void _tb_key(TbKey *k, uint8_t family, const uint8_t *addr,
                         uint32_t n) noexcept nogil:
    """A key of an address and, in b, the peer id `n` (transit and real_rev key a
    peer's mappings so; 0 elsewhere); or (addr == NULL) of the id `n` alone."""
    memset(k, 0, sizeof(TbKey))
    k.family = family
    if addr != NULL:
        memcpy(k.a, addr, 4 if family == 4 else 16)
        memcpy(k.b, &n, 4)
    else:
        memcpy(k.a, &n, 4)


cdef inline const uint8_t *_tb_packed(const TbKey *k, uint8_t *key4) noexcept nogil:
    """The key's bytes as its half stores them (key4: room for an IPv4 key's 8)."""
    if k.family != 4:
        return k.a  # a and b[:4] are one 20-byte run
    memcpy(key4, k.a, 4)
    memcpy(key4 + 4, k.b, 4)
    return key4


cdef inline uint32_t _tb_hash(const uint8_t *key, uint8_t family, uint64_t seed) noexcept nogil:
    # The packed key's bytes; the family through the seed (a map keeps IPv6
    # keys and ids, family 0, apart anyway: it never holds both). A 20-byte
    # key: two words, and its last 4 bytes through the seed too.
    cdef uint32_t tail
    if family == 4:
        return <uint32_t>c25_hash_words(key, 1, seed ^ 4) | TB_USED
    memcpy(&tail, key + 16, 4)
    return <uint32_t>c25_hash_words(key, 2, seed ^ family ^ (<uint64_t>tail << 8)) | TB_USED


cdef inline void *_tb_val_ptr(const TbVal *v) noexcept nogil:
    cdef void *p
    memcpy(&p, v.addr, sizeof(void *))
    return p


cdef inline TbPeer *_tb_ref_peer(const TbRef *r) noexcept nogil:
    """The record a peers-map entry holds, read in place (see _tb_val_ptr)."""
    cdef void *p
    memcpy(&p, r.addr, sizeof(void *))
    return <TbPeer *>p


cdef inline void _tb_val_set_ptr(TbVal *v, void *p) noexcept nogil:
    memcpy(v.addr, &p, sizeof(void *))


cdef int _th_init(TbHalf *h, uint32_t nslots) noexcept nogil:
    cdef void *p = c25_zalloc(nslots * sizeof(h.slots[0]))
    if p == NULL:
        return -1
    if TbHalf is TbHalf4:
        h.slots = <TbSlot4 *>p
    else:
        h.slots = <TbSlot6 *>p
    h.mask = nslots - 1
    h.count = 0
    return 0


cdef inline void _th_free(TbHalf *h) noexcept nogil:
    c25_zfree(h.slots, (<size_t>h.mask + 1) * sizeof(h.slots[0]))
    h.slots = NULL


cdef int64_t _th_find(TbHalf *h, const uint8_t *key, uint32_t hash) noexcept nogil:
    """The slot of `key`, or -1."""
    cdef uint32_t i = hash & h.mask
    while h.slots[i].hash:
        if h.slots[i].hash == hash and memcmp(h.slots[i].key, key,
                                              sizeof(h.slots[i].key)) == 0:
            return i
        i = (i + 1) & h.mask
    return -1


cdef uint32_t _th_place(TbHalf *h, uint32_t hash) noexcept nogil:
    """The free slot a new entry of `hash` goes to (counted as used; the caller
    fills it)."""
    cdef uint32_t i = hash & h.mask
    while h.slots[i].hash:
        i = (i + 1) & h.mask
    h.slots[i].hash = hash
    h.count += 1
    return i


cdef int _th_reserve(TbHalf *h, uint32_t extra) noexcept nogil:
    """Make room for `extra` more entries (load stays <= 4/5); -1 if out of memory."""
    cdef uint64_t want = <uint64_t>h.count + extra
    cdef uint32_t nslots = h.mask + 1
    if want * 5 <= <uint64_t>nslots * 4:
        return 0
    while want * 5 > <uint64_t>nslots * 4:
        if nslots >= TB_MAX_SLOTS:
            return -1
        nslots <<= 1
    cdef TbHalf grown
    if _th_init(&grown, nslots) < 0:
        return -1
    cdef uint32_t i
    for i in range(h.mask + 1):
        if h.slots[i].hash:
            grown.slots[_th_place(&grown, h.slots[i].hash)] = h.slots[i]
    _th_free(h)
    h.slots = grown.slots
    h.mask = grown.mask
    return 0


cdef void _th_erase_at(TbHalf *h, uint32_t i) noexcept nogil:
    # Backward-shift deletion: pull later members of the probe run into the
    # hole unless that would move them before their home slot.
    cdef uint32_t j = i
    cdef uint32_t home
    while True:
        j = (j + 1) & h.mask
        if not h.slots[j].hash:
            break
        home = h.slots[j].hash & h.mask
        if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
            h.slots[i] = h.slots[j]
            i = j
    h.slots[i].hash = 0
    h.count -= 1


cdef inline void _th_ref(TbHalf *h, uint32_t i, TbRef *r) noexcept nogil:
    r.addr = h.slots[i].addr
    r.u32 = &h.slots[i].u32
    r.tag = &h.slots[i].tag
    r.when = &h.slots[i].when
    r.index = i
    r.alen = sizeof(h.slots[i].addr)


cdef void _th_erase_where_u32(TbHalf *h, uint32_t value) noexcept nogil:
    """Erase every entry whose u32 is `value`."""
    cdef uint32_t i
    for i in range(h.mask + 1):
        # An erase may shift a later entry into slot i: look at it again.
        while h.slots[i].hash and h.slots[i].u32 == value:
            _th_erase_at(h, i)


cdef inline void _th_entry(TbHalf *h, uint32_t i, uint8_t family, TbEntry *e) noexcept nogil:
    """Slot i as a whole entry of `family` (the half's keys are all of one)."""
    cdef TbRef r
    cdef size_t alen = sizeof(h.slots[i].key) - 4  # the address; then 4 bytes of b
    memset(&e.key, 0, sizeof(TbKey))
    e.key.family = family
    memcpy(e.key.a, h.slots[i].key, alen)
    memcpy(e.key.b, h.slots[i].key + alen, 4)
    _th_ref(h, i, &r)
    _tb_ref_get(&r, &e.val)


cdef uint32_t _th_chunk(TbHalf *h, uint8_t family, uint64_t *i, uint32_t n, uint32_t cap,
                        TbEntry *buf) noexcept nogil:
    """Copy entries from slot *i on into buf[n:cap]; *i moves past them. The new n."""
    while i[0] <= h.mask and n < cap:
        if h.slots[i[0]].hash:
            _th_entry(h, <uint32_t>i[0], family, &buf[n])
            n += 1
        i[0] += 1
    return n


cdef uint32_t _th_before(TbHalf *h, uint8_t family, double before, uint32_t n,
                         TbEntry *buf) noexcept nogil:
    """Copy the entries registered before `before` into buf[n:]; the new n."""
    cdef uint32_t i
    for i in range(h.mask + 1):
        if h.slots[i].hash and h.slots[i].when < before:
            _th_entry(h, i, family, &buf[n])
            n += 1
    return n


cdef inline void _tb_ref_get(const TbRef *r, TbVal *v) noexcept nogil:
    memset(v, 0, sizeof(TbVal))
    memcpy(v.addr, r.addr, r.alen)
    v.u32 = r.u32[0]
    v.tag = r.tag[0]
    v.when = r.when[0]


cdef inline void _tb_ref_set(const TbRef *r, const TbVal *v) noexcept nogil:
    memcpy(r.addr, v.addr, r.alen)
    r.u32[0] = v.u32
    r.tag[0] = v.tag
    r.when[0] = v.when


cdef int _tb_map_init(TbMap *m, uint32_t nslots) noexcept nogil:
    if _th_init(&m.h4, nslots) < 0:
        return -1
    if _th_init(&m.h6, nslots) < 0:
        _th_free(&m.h4)
        return -1
    return 0


cdef inline void _tb_map_free(TbMap *m) noexcept nogil:
    _th_free(&m.h4)
    _th_free(&m.h6)


cdef inline uint32_t _tb_count(const TbMap *m) noexcept nogil:
    return m.h4.count + m.h6.count


cdef bint _tb_find_packed(TbMap *m, uint8_t family, const uint8_t *key, uint32_t h,
                          TbRef *r) noexcept nogil:
    """_tb_find for a key already packed (_tb_packed) and hashed."""
    cdef int64_t i
    if family == 4:
        i = _th_find(&m.h4, key, h)
        if i >= 0:
            _th_ref(&m.h4, <uint32_t>i, r)
    else:
        i = _th_find(&m.h6, key, h)
        if i >= 0:
            _th_ref(&m.h6, <uint32_t>i, r)
    return i >= 0


cdef inline bint _tb_find(TbMap *m, const TbKey *k, uint64_t seed, TbRef *r) noexcept nogil:
    """Whether `k` is in the map; its entry's fields in *r if so."""
    cdef uint8_t key4[8]
    cdef const uint8_t *key = _tb_packed(k, key4)
    return _tb_find_packed(m, k.family, key, _tb_hash(key, k.family, seed), r)


cdef int _tb_reserve(TbMap *m, uint8_t family, uint32_t extra) noexcept nogil:
    """Make room for `extra` more keys of `family`; -1 if out of memory."""
    return _th_reserve(&m.h4, extra) if family == 4 else _th_reserve(&m.h6, extra)


cdef inline void _tb_erase(TbMap *m, const TbRef *r) noexcept nogil:
    if r.alen == 4:
        _th_erase_at(&m.h4, r.index)
    else:
        _th_erase_at(&m.h6, r.index)


cdef int _tb_put(TbMap *m, const TbKey *k, const TbVal *v, uint64_t seed,
                 TbVal *old) noexcept nogil:
    """Insert or replace; 1 if it replaced (previous value in *old), 0 if new,
    -1 if out of memory (nothing changed)."""
    cdef TbRef r
    cdef uint8_t key4[8]
    cdef const uint8_t *key = _tb_packed(k, key4)
    cdef uint32_t h = _tb_hash(key, k.family, seed)
    cdef uint32_t i
    if _tb_find_packed(m, k.family, key, h, &r):
        if old != NULL:
            _tb_ref_get(&r, old)
        _tb_ref_set(&r, v)
        return 1
    if _tb_reserve(m, k.family, 1) < 0:
        return -1
    if k.family == 4:
        i = _th_place(&m.h4, h)
        memcpy(m.h4.slots[i].key, key, 8)
        _th_ref(&m.h4, i, &r)
    else:
        i = _th_place(&m.h6, h)
        memcpy(m.h6.slots[i].key, key, 20)
        _th_ref(&m.h6, i, &r)
    _tb_ref_set(&r, v)
    return 0


cdef bint _tb_del(TbMap *m, const TbKey *k, uint64_t seed, TbVal *old) noexcept nogil:
    cdef TbRef r
    if not _tb_find(m, k, seed, &r):
        return False
    if old != NULL:
        _tb_ref_get(&r, old)
    _tb_erase(m, &r)
    return True


cdef bint _tb_in_ranges(const TbRange *r, uint32_t n, uint8_t family,
                        const uint8_t *addr) noexcept nogil:
    cdef int alen = 4 if family == 4 else 16
    cdef uint32_t i
    for i in range(n):
        if (r[i].family == family and memcmp(r[i].first, addr, alen) <= 0
                and memcmp(addr, r[i].last, alen) <= 0):
            return True
    return False


cdef bint _tb_route_locked(TablesC *t, uint8_t family, const uint8_t *addr,
                           uint32_t *peer) noexcept nogil:
    cdef TbKey k
    cdef TbRef r
    _tb_key(&k, family, addr, 0)
    if not _tb_find(&t.routes, &k, t.seed, &r):
        return False
    peer[0] = r.u32[0]
    return True


cdef void _tb_del_routes_to(TablesC *t, uint32_t peer) noexcept nogil:
    _th_erase_where_u32(&t.routes.h4, peer)
    _th_erase_where_u32(&t.routes.h6, peer)


cdef void _tb_free_maps(TablesC *t) noexcept nogil:
    _tb_map_free(&t.routes)
    _tb_map_free(&t.magic)
    _tb_map_free(&t.transit)
    _tb_map_free(&t.magic_rev)
    _tb_map_free(&t.real_rev)
    _tb_map_free(&t.peers)
    _tb_map_free(&t.indices)


cdef bint _tb_local_locked(TablesC *t, uint8_t family, const uint8_t *addr) noexcept nogil:
    cdef int alen = 4 if family == 4 else 16
    cdef uint32_t i
    for i in range(t.n_local):
        if t.local_family[i] == family and memcmp(t.local_addr[i], addr, alen) == 0:
            return True
    return False


cdef inline void _tb_rev_set(TablesC *t, const TbRef *r, uint32_t value) noexcept nogil:
    """Set a real_rev entry's count word, keeping the count of ambiguous entries
    (anything but exactly one known transit IP), which saving flows asks first."""
    t.rev_ambiguous -= r.u32[0] != 1
    t.rev_ambiguous += value != 1
    r.u32[0] = value


cdef void _tb_rev_add(TablesC *t, uint8_t family, uint32_t peer,
                      const uint8_t *real, const uint8_t *transit) noexcept nogil:
    """real_rev: one more transit IP of `peer` maps to `real` (room reserved)."""
    cdef TbKey k
    cdef TbVal v
    cdef TbRef r
    _tb_key(&k, family, real, peer)
    if _tb_find(&t.real_rev, &k, t.seed, &r):
        # The newest transit IP is remembered; with two or more the entry is
        # ambiguous anyway, and it stays so until the count is back to one.
        _tb_rev_set(t, &r, (r.u32[0] & TB_REV_COUNT) + 1)
        memcpy(r.addr, transit, r.alen)
        return
    memset(&v, 0, sizeof(TbVal))
    memcpy(v.addr, transit, 16)
    v.u32 = 1
    _tb_put(&t.real_rev, &k, &v, t.seed, NULL)


cdef void _tb_rev_drop(TablesC *t, uint8_t family, uint32_t peer,
                       const uint8_t *real, const uint8_t *transit) noexcept nogil:
    """real_rev: the mapping (peer, transit) -> real is gone."""
    cdef TbKey k
    cdef TbRef r
    _tb_key(&k, family, real, peer)
    if not _tb_find(&t.real_rev, &k, t.seed, &r):
        return
    cdef uint32_t n = r.u32[0] & TB_REV_COUNT
    if n <= 1:
        _tb_rev_set(t, &r, 1)  # no longer counted as ambiguous
        _tb_erase(&t.real_rev, &r)
        return
    # Which transit IP remains is not known without a scan of the transit
    # map: the entry says "stale" and return packets are not matched by it.
    cdef uint32_t stale = TB_REV_STALE if memcmp(r.addr, transit, r.alen) == 0 else 0
    _tb_rev_set(t, &r, (n - 1) | (r.u32[0] & TB_REV_STALE) | stale)


# ---- C API ------------------------------------------------------------------

cdef TablesC *tb_new(uint64_t seed) noexcept nogil:
    """Allocate empty tables; NULL if out of memory."""
    cdef TablesC *t = <TablesC *>malloc(sizeof(TablesC))
    if t == NULL:
        return NULL
    memset(t, 0, sizeof(TablesC))
    t.seed = seed
    if (_tb_map_init(&t.routes, 64) < 0 or _tb_map_init(&t.magic, 64) < 0
            or _tb_map_init(&t.transit, 64) < 0 or _tb_map_init(&t.magic_rev, 64) < 0
            or _tb_map_init(&t.real_rev, 64) < 0 or _tb_map_init(&t.peers, 16) < 0
            or _tb_map_init(&t.indices, 16) < 0):
        _tb_free_maps(t)
        free(t)
        return NULL
    pthread_mutex_init(&t.lock, NULL)
    return t


cdef void tb_free(TablesC *t) noexcept nogil:
    """Release the tables. No other thread may still be using them."""
    if t == NULL:
        return
    cdef uint32_t i
    cdef TbRef r
    cdef TbPeer *rec
    for i in range(t.peers.h6.mask + 1):  # ids are in the wide half
        if t.peers.h6.slots[i].hash:
            _th_ref(&t.peers.h6, i, &r)
            rec = _tb_ref_peer(&r)
            ss_free_staged(&rec.wg.staged)
            free(rec)
    pthread_mutex_destroy(&t.lock)
    _tb_free_maps(t)
    free(t.magic_ranges)
    free(t.transit_ranges)
    free(t)


# Lookups (the pumps' side).

cdef bint tb_route(TablesC *t, uint8_t family, const uint8_t *dst, uint32_t *peer) noexcept nogil:
    """Peer id that `dst` routes to (overlay address or registered transit IP)."""
    pthread_mutex_lock(&t.lock)
    cdef bint found = _tb_route_locked(t, family, dst, peer)
    pthread_mutex_unlock(&t.lock)
    return found


cdef int tb_magic(TablesC *t, uint8_t family, const uint8_t *addr,
                  uint8_t *transit_out) noexcept nogil:
    """Client: TB_HIT (transit IP copied to transit_out, 16 bytes), TB_UNMAPPED
    (a magic IP without assignment: answer ICMP unreachable) or
    TB_NOT_OURS."""
    cdef TbKey k
    _tb_key(&k, family, addr, 0)
    cdef int r = TB_NOT_OURS
    cdef TbRef e
    pthread_mutex_lock(&t.lock)
    if _tb_find(&t.magic, &k, t.seed, &e):
        c25_addr16(transit_out, e.addr, family)
        r = TB_HIT
    elif _tb_in_ranges(t.magic_ranges, t.n_magic_ranges, family, addr):
        r = TB_UNMAPPED
    pthread_mutex_unlock(&t.lock)
    return r


cdef int tb_transit(TablesC *t, uint8_t family, uint32_t peer,
                    const uint8_t *transit, uint8_t *real_out, uint32_t *app_out) noexcept nogil:
    """Connector: for a packet from peer `peer` to `transit`:
    TB_HIT (real IP to real_out, 16 bytes; app id to app_out), TB_UNMAPPED (a
    transit IP not mapped for this peer: reject) or TB_NOT_OURS."""
    cdef TbKey k
    _tb_key(&k, family, transit, peer)
    cdef int r = TB_NOT_OURS
    cdef TbRef e
    pthread_mutex_lock(&t.lock)
    if _tb_find(&t.transit, &k, t.seed, &e):
        c25_addr16(real_out, e.addr, family)
        app_out[0] = e.u32[0]
        r = TB_HIT
    elif _tb_in_ranges(t.transit_ranges, t.n_transit_ranges, family, transit):
        r = TB_UNMAPPED
    pthread_mutex_unlock(&t.lock)
    return r


cdef bint tb_is_local(TablesC *t, uint8_t family, const uint8_t *addr) noexcept nogil:
    """Whether `addr` is one of this node's own overlay addresses."""
    pthread_mutex_lock(&t.lock)
    cdef bint r = _tb_local_locked(t, family, addr)
    pthread_mutex_unlock(&t.lock)
    return r


cdef bint tb_local_of(TablesC *t, uint8_t family, uint8_t *out) noexcept nogil:
    """This node's first overlay address of `family` (16-byte form), if any."""
    cdef uint32_t i
    cdef bint found = False
    pthread_mutex_lock(&t.lock)
    for i in range(t.n_local):
        if t.local_family[i] == family:
            c25_addr16(out, t.local_addr[i], family)
            found = True
            break
    pthread_mutex_unlock(&t.lock)
    return found


cdef bint tb_magic_for_transit(TablesC *t, uint8_t family, const uint8_t *transit,
                               uint8_t *magic_out) noexcept nogil:
    """Client: the magic IP whose transit IP is `transit` (16 bytes out)."""
    cdef TbKey k
    cdef TbRef e
    _tb_key(&k, family, transit, 0)
    pthread_mutex_lock(&t.lock)
    cdef bint found = _tb_find(&t.magic_rev, &k, t.seed, &e)
    if found:
        c25_addr16(magic_out, e.addr, family)
    pthread_mutex_unlock(&t.lock)
    return found


cdef bint tb_any_ambiguous(TablesC *t) noexcept nogil:
    """Whether any (client, real address) pair names several transit IPs: the
    only case in which connector flows need saving."""
    pthread_mutex_lock(&t.lock)
    cdef bint r = t.rev_ambiguous != 0
    pthread_mutex_unlock(&t.lock)
    return r


cdef int tb_return_transit(TablesC *t, uint8_t family, uint32_t peer,
                           const uint8_t *real, uint8_t *transit_out,
                           uint32_t *app_out) noexcept nogil:
    """Connector: for a return packet from `real` to peer `peer`, the one
    transit IP of that peer mapped to `real`: TB_HIT (transit_out, 16 bytes;
    app_out), TB_AMBIGUOUS (several, or not known which) or TB_NOT_OURS."""
    cdef TbKey k
    cdef TbRef e
    cdef int r = TB_NOT_OURS
    _tb_key(&k, family, real, peer)
    pthread_mutex_lock(&t.lock)
    if _tb_find(&t.real_rev, &k, t.seed, &e):
        if e.u32[0] != 1:
            r = TB_AMBIGUOUS
        else:
            c25_addr16(transit_out, e.addr, family)
            _tb_key(&k, family, transit_out, peer)
            if (_tb_find(&t.transit, &k, t.seed, &e)
                    and memcmp(e.addr, real, e.alen) == 0):
                app_out[0] = e.u32[0]
                r = TB_HIT
            else:  # cannot happen while the maps are kept in step; fail closed
                r = TB_AMBIGUOUS
    pthread_mutex_unlock(&t.lock)
    return r


cdef TbPeer *tb_peer_locked(TablesC *t, uint32_t peer) noexcept nogil:
    """The record of `peer` (NULL if none); the caller holds t.lock."""
    cdef TbKey k
    cdef TbRef r
    _tb_key(&k, 0, NULL, peer)
    return _tb_ref_peer(&r) if _tb_find(&t.peers, &k, t.seed, &r) else NULL


cdef bint tb_source_ok(TablesC *t, uint32_t peer, uint8_t family,
                       const uint8_t *src) noexcept nogil:
    """Whether an inner source address may come from `peer`: it routes to that
    peer (its overlay addresses, or a transit IP registered with it, which is
    the source of a connector's replies)."""
    cdef uint32_t owner
    pthread_mutex_lock(&t.lock)
    cdef bint ok = _tb_route_locked(t, family, src, &owner) and owner == peer
    pthread_mutex_unlock(&t.lock)
    return ok


# Updates (the control plane's side). Each is atomic under the lock; those
# returning int give -1 when out of memory, with nothing changed.

cdef int tb_set_route(TablesC *t, uint8_t family, const uint8_t *dst, uint32_t peer) noexcept nogil:
    cdef TbKey k
    cdef TbVal v
    _tb_key(&k, family, dst, 0)
    memset(&v, 0, sizeof(TbVal))
    v.u32 = peer
    pthread_mutex_lock(&t.lock)
    cdef int r = _tb_put(&t.routes, &k, &v, t.seed, NULL)
    pthread_mutex_unlock(&t.lock)
    return -1 if r < 0 else 0


cdef void _tb_magic_rev_drop(TablesC *t, uint8_t family, const uint8_t *magic,
                             const uint8_t *transit) noexcept nogil:
    """magic_rev: forget transit -> magic, if it still names this magic IP."""
    cdef TbKey k
    cdef TbRef r
    _tb_key(&k, family, transit, 0)
    if _tb_find(&t.magic_rev, &k, t.seed, &r) and memcmp(r.addr, magic, r.alen) == 0:
        _tb_erase(&t.magic_rev, &r)


cdef int tb_set_magic(TablesC *t, uint8_t family, const uint8_t *magic,
                      const uint8_t *transit) noexcept nogil:
    cdef TbKey k, kr
    cdef TbVal v, old
    cdef int r = -1
    _tb_key(&k, family, magic, 0)
    _tb_key(&kr, family, transit, 0)
    memset(&v, 0, sizeof(TbVal))
    memcpy(v.addr, transit, 4 if family == 4 else 16)
    pthread_mutex_lock(&t.lock)
    if _tb_reserve(&t.magic, family, 1) == 0 and _tb_reserve(&t.magic_rev, family, 1) == 0:
        if _tb_put(&t.magic, &k, &v, t.seed, &old) == 1:
            _tb_magic_rev_drop(t, family, magic, old.addr)
        memset(&v, 0, sizeof(TbVal))
        memcpy(v.addr, magic, 4 if family == 4 else 16)
        _tb_put(&t.magic_rev, &kr, &v, t.seed, NULL)
        r = 0
    pthread_mutex_unlock(&t.lock)
    return r


cdef int tb_set_transit(TablesC *t, uint8_t family, uint32_t peer,
                        const uint8_t *transit, const uint8_t *real, uint32_t app,
                        uint32_t tag, double when) noexcept nogil:
    """Connector: map (peer, transit) -> real, app, with the control
    plane's tag and time. 0 if the key is new, 1 if it replaced a mapping,
    -1 if out of memory (nothing changed)."""
    cdef TbKey k
    cdef TbVal v, old
    cdef int r = -1
    cdef uint8_t tr16[16]
    c25_addr16(tr16, transit, family)
    _tb_key(&k, family, transit, peer)
    memset(&v, 0, sizeof(TbVal))
    memcpy(v.addr, real, 4 if family == 4 else 16)
    v.u32 = app
    v.tag = tag
    v.when = when
    pthread_mutex_lock(&t.lock)
    if (_tb_reserve(&t.transit, family, 1) == 0
            and _tb_reserve(&t.real_rev, family, 1) == 0):
        r = _tb_put(&t.transit, &k, &v, t.seed, &old)
        # A re-registration to the same real address leaves real_rev as it is
        # (dropping and adding it again would mark a shared entry stale).
        if r == 0 or memcmp(old.addr, v.addr, 16) != 0:
            if r == 1:
                _tb_rev_drop(t, family, peer, old.addr, tr16)
            _tb_rev_add(t, family, peer, real, tr16)
    pthread_mutex_unlock(&t.lock)
    return r


cdef bint tb_transit_entry(TablesC *t, uint8_t family, uint32_t peer,
                           const uint8_t *transit, TbVal *out) noexcept nogil:
    """Connector: the transit entry of (peer, transit), all of it, if any."""
    cdef TbKey k
    cdef TbRef r
    _tb_key(&k, family, transit, peer)
    pthread_mutex_lock(&t.lock)
    cdef bint found = _tb_find(&t.transit, &k, t.seed, &r)
    if found:
        _tb_ref_get(&r, out)
    pthread_mutex_unlock(&t.lock)
    return found


cdef int tb_set_local(TablesC *t, const uint8_t *families, const uint8_t (*addrs)[16],
                      uint32_t n) noexcept nogil:
    """Replace this node's own overlay addresses (at most TB_MAX_LOCAL)."""
    if n > TB_MAX_LOCAL:
        return -1
    pthread_mutex_lock(&t.lock)
    memcpy(t.local_family, families, n)
    memcpy(t.local_addr, addrs, n * 16)
    t.n_local = n
    pthread_mutex_unlock(&t.lock)
    return 0


cdef bint tb_del(TablesC *t, int which, uint8_t family, const uint8_t *a) noexcept nogil:
    """Remove a route (a=dst) or magic (a=magic) entry, `which` being TB_MAP_*;
    whether it existed."""
    cdef TbKey k
    cdef TbVal old
    _tb_key(&k, family, a, 0)
    pthread_mutex_lock(&t.lock)
    cdef TbMap *m = &t.routes if which == TB_MAP_ROUTES else &t.magic
    cdef bint found = _tb_del(m, &k, t.seed, &old)
    if found and which == TB_MAP_MAGIC:
        _tb_magic_rev_drop(t, family, a, old.addr)
    pthread_mutex_unlock(&t.lock)
    return found


cdef bint tb_del_transit(TablesC *t, uint8_t family, uint32_t peer,
                         const uint8_t *transit) noexcept nogil:
    """Connector: remove the mapping of (peer, transit); whether it existed."""
    cdef TbKey k
    cdef TbVal old
    cdef uint8_t tr16[16]
    c25_addr16(tr16, transit, family)
    _tb_key(&k, family, transit, peer)
    pthread_mutex_lock(&t.lock)
    cdef bint found = _tb_del(&t.transit, &k, t.seed, &old)
    if found:
        _tb_rev_drop(t, family, peer, old.addr, tr16)
    pthread_mutex_unlock(&t.lock)
    return found


cdef TbRange *tb_swap_ranges(TablesC *t, bint transit, TbRange *ranges, uint32_t n,
                             uint32_t *old_n) noexcept nogil:
    """Replace the magic (transit=False) or transit ranges with `ranges`
    (ownership passes to the tables); returns the old array for the caller to
    free after the lock is released."""
    cdef TbRange *old
    pthread_mutex_lock(&t.lock)
    if transit:
        old = t.transit_ranges
        old_n[0] = t.n_transit_ranges
        t.transit_ranges = ranges
        t.n_transit_ranges = n
    else:
        old = t.magic_ranges
        old_n[0] = t.n_magic_ranges
        t.magic_ranges = ranges
        t.n_magic_ranges = n
    pthread_mutex_unlock(&t.lock)
    return old


cdef int tb_set_peer(TablesC *t, uint32_t peer, TbPeer *rec, TbPeer **old) noexcept nogil:
    """Install or replace a peer: its configured endpoint (rec.wg.configured)
    and a route to `peer` for each of its overlay addresses (routes of a
    replaced record's overlay addresses that still point to this peer are
    removed). A replaced record's sessions, learned endpoint, counts and
    staged packets move to the new one: a reload keeps the peer's traffic.
    `rec` is malloc'd; on success the tables own it and *old is the replaced
    record (or NULL) for the caller to free after the lock is released.
    Returns 0, or -1 if out of memory; on failure nothing changed."""
    cdef TbKey kp, kr
    cdef TbVal v
    cdef TbRef r
    cdef TbPeer *prev = NULL
    cdef uint32_t i
    old[0] = NULL
    _tb_key(&kp, 0, NULL, peer)
    pthread_mutex_lock(&t.lock)
    if (_tb_reserve(&t.peers, 0, 1) < 0 or _tb_reserve(&t.routes, 4, rec.n_overlay) < 0
            or _tb_reserve(&t.routes, 6, rec.n_overlay) < 0):
        pthread_mutex_unlock(&t.lock)
        return -1
    # From here on nothing allocates, so the update cannot fail half-way.
    if _tb_find(&t.peers, &kp, t.seed, &r):
        prev = _tb_ref_peer(&r)
        ss_carry(&rec.wg, &prev.wg)
        for i in range(prev.n_overlay):
            _tb_key(&kr, prev.ov_family[i], prev.ov_addr[i], 0)
            if _tb_find(&t.routes, &kr, t.seed, &r) and r.u32[0] == peer:
                _tb_erase(&t.routes, &r)
    else:
        memcpy(&rec.wg.ep, &rec.wg.configured, sizeof(TbEndpoint))
    memset(&v, 0, sizeof(TbVal))
    _tb_val_set_ptr(&v, rec)
    _tb_put(&t.peers, &kp, &v, t.seed, NULL)
    memset(&v, 0, sizeof(TbVal))
    v.u32 = peer
    for i in range(rec.n_overlay):
        _tb_key(&kr, rec.ov_family[i], rec.ov_addr[i], 0)
        _tb_put(&t.routes, &kr, &v, t.seed, NULL)
    pthread_mutex_unlock(&t.lock)
    old[0] = prev
    return 0


cdef TbPeer *tb_del_peer(TablesC *t, uint32_t peer) noexcept nogil:
    """Remove a peer, its session indices and every route to it (overlay
    addresses and transit IPs alike). Returns its record for the caller to
    free (staged packets included), or NULL if there was no such peer."""
    cdef TbKey k
    cdef TbVal old
    cdef TbPeer *rec = NULL
    _tb_key(&k, 0, NULL, peer)
    pthread_mutex_lock(&t.lock)
    if _tb_del(&t.peers, &k, t.seed, &old):
        rec = <TbPeer *>_tb_val_ptr(&old)
        ss_unindex(t, &rec.wg)
        _tb_del_routes_to(t, peer)
    pthread_mutex_unlock(&t.lock)
    return rec


cdef int _tb_entry_older(const void *x, const void *y) noexcept nogil:
    """qsort order of transit entries: registration time, then the key's bytes."""
    cdef const TbEntry *a = <const TbEntry *>x
    cdef const TbEntry *b = <const TbEntry *>y
    if a.val.when != b.val.when:
        return -1 if a.val.when < b.val.when else 1
    if a.key.family != b.key.family:
        return -1 if a.key.family < b.key.family else 1
    return memcmp(a.key.a, b.key.a, 20)


# ---- Python boundary (control plane and tests) -------------------------------

cdef tuple _tb_entry_out(const TbEntry *e):
    """A transit entry as Python sees it: (peer, transit, real, app, registered, tag)."""
    cdef uint8_t fam = e.key.family
    cdef uint32_t peer
    memcpy(&peer, e.key.b, 4)
    return (peer, cv_addr_out(e.key.a, fam), cv_addr_out(e.val.addr, fam),
            e.val.u32, e.val.when, e.val.tag)


cdef int _tb_range_in(object r, TbRange *out) except -1:
    """A range as (first, last) packed addresses, or anything with `version`,
    `first`, `last` as integers (conn25.iprange.IPRange)."""
    cdef int fam, fam2, alen
    memset(out, 0, sizeof(TbRange))
    if hasattr(r, "version") and hasattr(r, "first") and hasattr(r, "last"):
        if r.version not in (4, 6):
            raise ValueError(f"range {r!r}: version must be 4 or 6")
        alen = 4 if r.version == 4 else 16
        try:
            first = int(r.first).to_bytes(alen, "big")
            last = int(r.last).to_bytes(alen, "big")
        except OverflowError:
            raise ValueError(f"range {r!r}: bound out of range for IPv{r.version}")
    else:
        try:
            first, last = r
        except (TypeError, ValueError):
            raise ValueError(f"range: expected (first, last) addresses, got {r!r}")
    fam = cv_addr_in(first, out.first, "range first")
    fam2 = cv_addr_in(last, out.last, "range last")
    if fam != fam2:
        raise ValueError(f"range {r!r}: first and last are of different address families")
    if memcmp(out.first, out.last, 16) > 0:
        raise ValueError(f"range {r!r}: first is after last")
    out.family = <uint8_t>fam
    return 0


_TB_MAGIC_STATUS = ("not_ours", "hit", "unassigned")
_TB_TRANSIT_STATUS = ("not_ours", "hit", "unmapped")
_TB_INBOUND_STATUS = ("ok", "unknown_peer", "spoofed")


cdef class Tables:
    """Route, magic, transit and peer tables, for the control plane and tests.

    All addresses are packed (bytes of 4 or 16, or ipaddress objects); a wrong
    length raises ValueError, as does mixing families within one entry. The
    pumps use the C API (tb_*) on `.tables` directly, without the GIL.
    """

    cdef TablesC *tables

    def __cinit__(self, seed: int | None = None) -> None:
        if seed is None:
            import os
            seed = int.from_bytes(os.urandom(8), "little")
        self.tables = tb_new(seed & 0xFFFFFFFFFFFFFFFF)
        if self.tables == NULL:
            raise MemoryError("Tables: cannot allocate")

    def __dealloc__(self) -> None:
        tb_free(self.tables)
        self.tables = NULL

    # routes

    def set_route(self, dst: object, peer: int) -> None:
        """Route packets to `dst` (an overlay or transit IP) to `peer`."""
        cdef uint8_t a[16]
        cdef uint8_t fam = cv_addr_in(dst, a, "route dst")
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef int r
        with nogil:
            r = tb_set_route(self.tables, fam, a, p)
        if r < 0:
            raise MemoryError("Tables.set_route")

    def del_route(self, dst: object) -> bool:
        cdef uint8_t a[16]
        cdef uint8_t fam = cv_addr_in(dst, a, "route dst")
        cdef bint found
        with nogil:
            found = tb_del(self.tables, TB_MAP_ROUTES, fam, a)
        return found

    def lookup_route(self, dst: object) -> int | None:
        """Peer id for `dst`, or None."""
        cdef uint8_t a[16]
        cdef uint8_t fam = cv_addr_in(dst, a, "route dst")
        cdef uint32_t p
        cdef bint found
        with nogil:
            found = tb_route(self.tables, fam, a, &p)
        return p if found else None

    # client magic IPs

    def set_magic(self, magic: object, transit: object) -> None:
        """Map magic IP -> transit IP (same family)."""
        cdef uint8_t m[16]
        cdef uint8_t tr[16]
        cdef uint8_t fam = cv_addr_in(magic, m, "magic")
        if cv_addr_in(transit, tr, "transit") != fam:
            raise ValueError("set_magic: magic and transit are of different address families")
        cdef int r
        with nogil:
            r = tb_set_magic(self.tables, fam, m, tr)
        if r < 0:
            raise MemoryError("Tables.set_magic")

    def del_magic(self, magic: object) -> bool:
        cdef uint8_t m[16]
        cdef uint8_t fam = cv_addr_in(magic, m, "magic")
        cdef bint found
        with nogil:
            found = tb_del(self.tables, TB_MAP_MAGIC, fam, m)
        return found

    def lookup_magic(self, addr: object) -> tuple:
        """('hit', transit) | ('unassigned', None) inside a magic range |
        ('not_ours', None)."""
        cdef uint8_t m[16]
        cdef uint8_t tr[16]
        cdef uint8_t fam = cv_addr_in(addr, m, "magic")
        cdef int r
        with nogil:
            r = tb_magic(self.tables, fam, m, tr)
        return (_TB_MAGIC_STATUS[r], cv_addr_out(tr, fam) if r == TB_HIT else None)

    def magic_for_transit(self, transit: object) -> object:
        """The magic IP whose transit IP is `transit`, or None."""
        cdef uint8_t tr[16]
        cdef uint8_t m[16]
        cdef uint8_t fam = cv_addr_in(transit, tr, "transit")
        cdef bint found
        with nogil:
            found = tb_magic_for_transit(self.tables, fam, tr, m)
        return cv_addr_out(m, fam) if found else None

    def set_magic_ranges(self, ranges: object) -> None:
        """Replace the magic ranges (see _tb_range_in for the accepted forms)."""
        self._set_ranges(False, ranges)

    # connector transit IPs

    def set_transit(self, peer: int, transit: object, real: object,
                    app: int = 0, registered: float = 0.0, tag: int = 0) -> bool:
        """Map (peer id, transit IP) -> (real IP, app id); the entry also keeps
        the control plane's `registered` time and `tag` for it. Whether (peer,
        transit IP) was not mapped before."""
        cdef uint32_t pid = cv_u32_in(peer, "peer")
        cdef uint8_t tr[16]
        cdef uint8_t rl[16]
        cdef uint8_t fam = cv_addr_in(transit, tr, "transit")
        if cv_addr_in(real, rl, "real") != fam:
            raise ValueError("set_transit: transit and real are of different address families")
        cdef uint32_t a = cv_u32_in(app, "app")
        cdef uint32_t g = cv_u32_in(tag, "tag")
        cdef double when = registered
        cdef int r
        with nogil:
            r = tb_set_transit(self.tables, fam, pid, tr, rl, a, g, when)
        if r < 0:
            raise MemoryError("Tables.set_transit")
        return r == 0

    def transit_entry(self, peer: int, transit: object) -> tuple | None:
        """(real, app, registered, tag) of the mapping of (peer id, transit), or None."""
        cdef uint32_t pid = cv_u32_in(peer, "peer")
        cdef uint8_t tr[16]
        cdef uint8_t fam = cv_addr_in(transit, tr, "transit")
        cdef TbVal v
        cdef bint found
        with nogil:
            found = tb_transit_entry(self.tables, fam, pid, tr, &v)
        if not found:
            return None
        return (cv_addr_out(v.addr, fam), v.u32, v.when, v.tag)

    def transit_chunk(self, start: int, count: int) -> tuple:
        """(entries, next): up to `count` transit entries, as transit_entries gives
        them, from slot `start` on, in slot order, and the slot to go on from (-1:
        none left). For walking every mapping a chunk at a time: the walk sees each
        entry once if nothing writes the map in between (the control plane is its
        only writer)."""
        cdef TablesC *t = self.tables
        cdef TbMap *m = &t.transit
        if count < 1 or start < 0:
            raise ValueError(f"transit_chunk: start {start!r} >= 0, count {count!r} >= 1")
        cdef uint32_t cap = count if count < 4096 else 4096
        cdef TbEntry *buf = <TbEntry *>malloc(cap * sizeof(TbEntry))
        if buf == NULL:
            raise MemoryError("Tables.transit_chunk")
        cdef uint32_t n = 0
        cdef uint64_t i = start, j, n4
        cdef bint done
        with nogil:  # slot numbers run through the IPv4 half, then the IPv6 one
            pthread_mutex_lock(&t.lock)
            n4 = <uint64_t>m.h4.mask + 1
            if i < n4:
                n = _th_chunk(&m.h4, 4, &i, n, cap, buf)
            if i >= n4:
                j = i - n4
                n = _th_chunk(&m.h6, 6, &j, n, cap, buf)
                i = n4 + j
            done = i >= n4 + m.h6.mask + 1
            pthread_mutex_unlock(&t.lock)
        try:
            return [_tb_entry_out(&buf[k]) for k in range(n)], (-1 if done else i)
        finally:
            free(buf)

    def transit_entries(self, double before=INFINITY, limit: int = -1) -> list:
        """The transit map's entries as (peer id, transit, real, app, registered,
        tag), packed addresses: those registered before `before`, the oldest
        first (then by family, transit IP and peer), at most `limit`
        of them (-1: all). One copy under the lock, the rest without it."""
        cdef TablesC *t = self.tables
        cdef TbMap *m = &t.transit
        cdef TbEntry *buf = NULL
        cdef uint32_t n = 0, i, size = 0, need = 0
        cdef bint done = False
        while not done:  # a buffer as large as the map, then the copy (it may grow between)
            with nogil:
                pthread_mutex_lock(&t.lock)
                if _tb_count(m) <= size:
                    n = _th_before(&m.h4, 4, before, 0, buf)
                    n = _th_before(&m.h6, 6, before, n, buf)
                    done = True
                else:
                    need = _tb_count(m)
                pthread_mutex_unlock(&t.lock)
            if not done:
                free(buf)
                buf = <TbEntry *>malloc(need * sizeof(TbEntry))
                if buf == NULL:
                    raise MemoryError("Tables.transit_entries")
                size = need
        try:
            if before != INFINITY or limit >= 0:
                qsort(buf, n, sizeof(TbEntry), _tb_entry_older)
            if 0 <= limit < n:
                n = limit
            return [_tb_entry_out(&buf[i]) for i in range(n)]
        finally:
            free(buf)

    def del_transit(self, peer: int, transit: object) -> bool:
        cdef uint32_t pid = cv_u32_in(peer, "peer")
        cdef uint8_t tr[16]
        cdef uint8_t fam = cv_addr_in(transit, tr, "transit")
        cdef bint found
        with nogil:
            found = tb_del_transit(self.tables, fam, pid, tr)
        return found

    def lookup_transit(self, peer: int, transit: object) -> tuple:
        """For a packet from peer `peer` to `transit`: ('hit', real, app) |
        ('unmapped', None, None) inside a transit range | ('not_ours', None, None)."""
        cdef uint32_t pid = cv_u32_in(peer, "peer")
        cdef uint8_t tr[16]
        cdef uint8_t rl[16]
        cdef uint8_t fam = cv_addr_in(transit, tr, "transit")
        cdef uint32_t a
        cdef int r
        with nogil:
            r = tb_transit(self.tables, fam, pid, tr, rl, &a)
        if r == TB_HIT:
            return ("hit", cv_addr_out(rl, fam), a)
        return (_TB_TRANSIT_STATUS[r], None, None)

    def lookup_return(self, peer: int, real: object) -> tuple:
        """For a return packet from `real` to peer `peer`: ('hit', transit, app)
        when exactly one of that peer's transit IPs maps to `real`,
        ('ambiguous', None, None) when several do, else ('not_ours', None, None)."""
        cdef uint32_t pid = cv_u32_in(peer, "peer")
        cdef uint8_t rl[16]
        cdef uint8_t tr[16]
        cdef uint8_t fam = cv_addr_in(real, rl, "real")
        cdef uint32_t a
        cdef int r
        with nogil:
            r = tb_return_transit(self.tables, fam, pid, rl, tr, &a)
        if r == TB_HIT:
            return ("hit", cv_addr_out(tr, fam), a)
        return ("ambiguous" if r == TB_AMBIGUOUS else "not_ours", None, None)

    def set_transit_ranges(self, ranges: object) -> None:
        """Replace the transit ranges (see _tb_range_in for the accepted forms)."""
        self._set_ranges(True, ranges)

    cdef _set_ranges(self, bint transit, object ranges):
        items = list(ranges)
        cdef uint32_t n = len(items)
        cdef uint32_t old_n, i
        cdef TbRange *arr = <TbRange *>malloc((n if n else 1) * sizeof(TbRange))
        if arr == NULL:
            raise MemoryError("Tables: ranges")
        try:
            for i in range(n):
                _tb_range_in(items[i], &arr[i])
        except BaseException:
            free(arr)
            raise
        cdef TbRange *old
        with nogil:
            old = tb_swap_ranges(self.tables, transit, arr, n, &old_n)
        free(old)

    # this node

    def set_local(self, addresses: object) -> None:
        """Replace this node's own overlay addresses (at most 8): the only
        destinations the overlay reaches untranslated, and the only sources
        of untranslated packets sent to it."""
        items = list(addresses)
        if len(items) > TB_MAX_LOCAL:
            raise ValueError(f"set_local: at most {TB_MAX_LOCAL} addresses, got {len(items)}")
        cdef uint8_t fams[<int>TB_MAX_LOCAL]
        cdef uint8_t addrs[<int>TB_MAX_LOCAL][16]
        cdef uint32_t i, n = len(items)
        for i in range(n):
            fams[i] = cv_addr_in(items[i], addrs[i], "local address")
        with nogil:
            tb_set_local(self.tables, fams, addrs, n)

    def is_local(self, addr: object) -> bool:
        cdef uint8_t a[16]
        cdef uint8_t fam = cv_addr_in(addr, a, "address")
        cdef bint r
        with nogil:
            r = tb_is_local(self.tables, fam, a)
        return r

    # peers and anti-spoofing

    def set_peer(self, peer: int, endpoint: object, port: int, overlay: object) -> None:
        """Install or replace peer `peer`: its configured underlay endpoint:port
        (None: it has none; it is reachable once it made contact) and its
        overlay addresses (each gets a route to the peer). A replaced peer
        keeps its sessions and learned endpoint, unless the configured
        endpoint changed: then that is where its datagrams go."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        if not 0 <= port <= 65535:
            raise ValueError(f"set_peer: port {port!r} not in 0..65535")
        ovs = list(overlay)
        if len(ovs) > TB_MAX_OVERLAY:
            raise ValueError(f"set_peer: at most {TB_MAX_OVERLAY} overlay addresses, "
                             f"got {len(ovs)}")
        cdef TbPeer *rec = <TbPeer *>calloc(1, sizeof(TbPeer))
        if rec == NULL:
            raise MemoryError("Tables.set_peer")
        cdef TbPeer *old
        cdef int r
        cdef uint32_t i
        try:
            if endpoint is not None:
                rec.wg.configured.family = cv_addr_in(endpoint, rec.wg.configured.addr,
                                                      "peer endpoint")
                rec.wg.configured.port = port
            for i in range(len(ovs)):
                rec.ov_family[i] = cv_addr_in(ovs[i], rec.ov_addr[i], "peer overlay address")
            rec.n_overlay = len(ovs)
        except BaseException:
            free(rec)
            raise
        with nogil:
            r = tb_set_peer(self.tables, p, rec, &old)
        if r < 0:
            free(rec)
            raise MemoryError("Tables.set_peer")
        free(old)

    def del_peer(self, peer: int) -> bool:
        """Remove a peer, its sessions and every route to it."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef TbPeer *rec
        with nogil:
            rec = tb_del_peer(self.tables, p)
            if rec != NULL:
                ss_free_staged(&rec.wg.staged)
        free(rec)
        return rec != NULL

    def lookup_peer(self, peer: int) -> tuple | None:
        """(endpoint, port, [overlay addresses]) of `peer`, or None; endpoint
        is where its datagrams go now (None while unknown)."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef TbPeer *rec
        cdef TbEndpoint ep
        cdef uint8_t fams[8]
        cdef uint8_t addrs[8][16]
        cdef uint32_t n = 0
        cdef bint found = False
        with nogil:
            pthread_mutex_lock(&self.tables.lock)
            rec = tb_peer_locked(self.tables, p)
            if rec != NULL:
                found = True
                ep = rec.wg.ep
                n = rec.n_overlay
                memcpy(fams, rec.ov_family, sizeof(fams))
                memcpy(addrs, rec.ov_addr, sizeof(addrs))
            pthread_mutex_unlock(&self.tables.lock)
        if not found:
            return None
        return (cv_addr_out(ep.addr, ep.family) if ep.family else None, ep.port,
                [cv_addr_out(addrs[i], fams[i]) for i in range(n)])

    def source_ok(self, peer: int, src: object) -> bool:
        """Whether inner source `src` may arrive from `peer` (routes to it)."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef uint8_t a[16]
        cdef uint8_t fam = cv_addr_in(src, a, "inner source")
        cdef bint ok
        with nogil:
            ok = tb_source_ok(self.tables, p, fam, a)
        return ok

    def stats(self) -> dict:
        """Entry counts per table."""
        cdef TablesC *t = self.tables
        cdef uint32_t c[10]
        with nogil:
            pthread_mutex_lock(&t.lock)
            c[0] = _tb_count(&t.routes)
            c[1] = _tb_count(&t.magic)
            c[2] = _tb_count(&t.transit)
            c[3] = _tb_count(&t.peers)
            c[4] = _tb_count(&t.indices)
            c[5] = t.n_magic_ranges
            c[6] = t.n_transit_ranges
            c[7] = _tb_count(&t.magic_rev)
            c[8] = _tb_count(&t.real_rev)
            c[9] = t.n_local
            pthread_mutex_unlock(&t.lock)
        return {"routes": c[0], "magic": c[1], "transit": c[2], "peers": c[3],
                "indices": c[4], "magic_ranges": c[5], "transit_ranges": c[6],
                "magic_rev": c[7], "real_rev": c[8], "local": c[9]}

    def memory(self) -> dict:
        """Per map: its slots in each half ({4: IPv4 keys, 6: IPv6 keys and ids}) and
        the bytes of its slot arrays; and the bytes of one slot per half (a slot
        array's pages are resident once touched)."""
        cdef TablesC *t = self.tables
        cdef TbMap *maps[7]
        cdef uint32_t c4[7]
        cdef uint32_t c6[7]
        cdef int i
        maps[:] = [&t.routes, &t.magic, &t.transit, &t.peers, &t.indices, &t.magic_rev,
                   &t.real_rev]
        with nogil:
            pthread_mutex_lock(&t.lock)
            for i in range(7):
                c4[i] = maps[i].h4.mask + 1
                c6[i] = maps[i].h6.mask + 1
            pthread_mutex_unlock(&t.lock)
        out: dict = {"slot_bytes": {4: sizeof(TbSlot4), 6: sizeof(TbSlot6)}}
        for i, name in enumerate(("routes", "magic", "transit", "peers", "indices",
                                  "magic_rev", "real_rev")):
            out[f"{name}_slots"] = {4: c4[i], 6: c6[i]}
            out[f"{name}_bytes"] = c4[i] * sizeof(TbSlot4) + c6[i] * sizeof(TbSlot6)
        return out
