# The flow table; what it guarantees and its types are in flowtable.pxd.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from includes.pthread cimport (
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
)


cdef enum:
    _FT_DRAIN_CHUNK = 128       # events copied out per lock in drain_events (13 KiB of stack)


# ---- keys (lock not needed) ----------------------------------------------

cdef inline uint64_t _ft_key_hash(const FlowKey *k, uint64_t seed) noexcept nogil:
    cdef uint64_t h = c25_hash_words(k.src, 2, seed)
    h = c25_hash_words(k.dst, 2, h)
    cdef uint64_t w = (<uint64_t>k.sport | (<uint64_t>k.dport << 16)
                       | (<uint64_t>k.family << 32) | (<uint64_t>k.proto << 40))
    return c25_mix(h ^ w)


cdef inline bint _ft_key_eq(const FlowKey *a, const FlowKey *b) noexcept nogil:
    return (a.sport == b.sport and a.dport == b.dport and a.proto == b.proto
            and a.family == b.family and memcmp(a.src, b.src, 16) == 0
            and memcmp(a.dst, b.dst, 16) == 0)


cdef inline void _ft_key_norm(const FlowKey *k, FlowKey *out) noexcept nogil:
    # Keys are stored and hashed with their unused bytes zeroed, whatever the
    # caller left in an IPv4 key's address tail or in _pad.
    cdef int n = 4 if k.family == 4 else 16
    memset(out, 0, sizeof(FlowKey))
    memcpy(out.src, k.src, n)
    memcpy(out.dst, k.dst, n)
    out.sport = k.sport
    out.dport = k.dport
    out.family = k.family
    out.proto = k.proto


cdef inline int _ft_addr_index(const FlowKey *kf, const FlowKey *kr,
                               const uint8_t *addr) noexcept nogil:
    """Which of the normalised keys' addresses `addr` is (FT_ADDR_*), or -1."""
    cdef int n = 4 if kf.family == 4 else 16
    if memcmp(addr, kr.src, n) == 0:
        return FT_ADDR_REV_SRC
    if memcmp(addr, kf.dst, n) == 0:
        return FT_ADDR_FWD_DST
    if memcmp(addr, kf.src, n) == 0:
        return FT_ADDR_FWD_SRC
    if memcmp(addr, kr.dst, n) == 0:
        return FT_ADDR_REV_DST
    return -1


cdef inline const uint8_t *_ft_addr(const FlowEntry *e, uint8_t which) noexcept nogil:
    cdef const FlowKey *k = &e.key[which >> 1]
    if which & 1:
        return &k.dst[0]
    return &k.src[0]


# ---- internals (lock held) ------------------------------------------------

cdef inline int32_t _ft_find(FlowTableC *t, const FlowKey *k) noexcept nogil:
    """Slot (index * 2 + dir) holding key k, or -1."""
    cdef int32_t s = t.buckets[_ft_key_hash(k, t.seed) & t.bucket_mask]
    while s >= 0:
        if _ft_key_eq(&t.flows[s >> 1].key[s & 1], k):
            return s
        s = t.flows[s >> 1].hnext[s & 1]
    return -1


cdef inline void _ft_link_key(FlowTableC *t, int32_t s) noexcept nogil:
    cdef FlowEntry *e = &t.flows[s >> 1]
    cdef uint32_t b = _ft_key_hash(&e.key[s & 1], t.seed) & t.bucket_mask
    e.hnext[s & 1] = t.buckets[b]
    t.buckets[b] = s


cdef inline void _ft_unlink_key(FlowTableC *t, int32_t s) noexcept nogil:
    cdef FlowEntry *e = &t.flows[s >> 1]
    cdef uint32_t b = _ft_key_hash(&e.key[s & 1], t.seed) & t.bucket_mask
    cdef int32_t *link = &t.buckets[b]
    while link[0] >= 0:
        if link[0] == s:
            link[0] = e.hnext[s & 1]
            return
        link = &t.flows[link[0] >> 1].hnext[link[0] & 1]


cdef inline void _ft_lru_unlink(FlowTableC *t, int32_t i) noexcept nogil:
    cdef FlowEntry *e = &t.flows[i]
    if e.prev >= 0:
        t.flows[e.prev].next = e.next
    else:
        t.lru_head = e.next
    if e.next >= 0:
        t.flows[e.next].prev = e.prev
    else:
        t.lru_tail = e.prev


cdef inline void _ft_lru_push(FlowTableC *t, int32_t i) noexcept nogil:
    cdef FlowEntry *e = &t.flows[i]
    e.prev = -1
    e.next = t.lru_head
    if t.lru_head >= 0:
        t.flows[t.lru_head].prev = i
    else:
        t.lru_tail = i
    t.lru_head = i


cdef inline void _ft_emit(FlowTableC *t, FlowEntry *e, uint8_t kind, uint8_t reason) noexcept nogil:
    if t.ring_len == t.ring_cap:
        t.events_dropped += 1
        return
    cdef FlowEventRec *r = &t.ring[(t.ring_start + t.ring_len) % t.ring_cap]
    t.ring_len += 1
    t.emitted += 1
    memcpy(&r.key, &e.key[FT_DIR_FWD], sizeof(FlowKey))
    memcpy(r.transit, _ft_addr(e, e.addr_of[2]), 16)
    r.created = e.created
    r.last_used = e.last_used
    r.packets = e.packets
    r.bytes = e.bytes
    r.peer = e.peer
    r.app = e.app
    r.kind = kind
    r.reason = reason


cdef inline void _ft_remove(FlowTableC *t, int32_t i, uint8_t reason) noexcept nogil:
    cdef FlowEntry *e = &t.flows[i]
    _ft_emit(t, e, FT_EV_REMOVED, reason)
    _ft_unlink_key(t, i * 2)
    _ft_unlink_key(t, i * 2 + 1)
    _ft_lru_unlink(t, i)
    e.key[FT_DIR_FWD].family = 0  # a free entry (fs_export skips it)
    e.next = t.free_head
    t.free_head = i
    t.count -= 1
    t.removed[reason] += 1


cdef inline uint64_t _ft_tick(FlowTableC *t, uint64_t now) noexcept nogil:
    if now > t.clock:
        t.clock = now
    return t.clock


# ---- C API ------------------------------------------------------------------

cdef FlowTableC *ft_new(uint32_t capacity, uint64_t idle_ms, uint32_t ring_cap,
                        uint64_t seed) noexcept nogil:
    """Allocate a table; NULL if out of memory or an argument is out of range
    (capacity 1..FT_MAX_CAPACITY, idle_ms > 0, ring_cap > 0)."""
    if capacity == 0 or capacity > FT_MAX_CAPACITY or idle_ms == 0 or ring_cap == 0:
        return NULL
    cdef FlowTableC *t = <FlowTableC *>malloc(sizeof(FlowTableC))
    if t == NULL:
        return NULL
    memset(t, 0, sizeof(FlowTableC))
    cdef uint32_t nb = 16
    while nb < 2 * capacity:  # two keys per flow: chains stay about one long
        nb <<= 1
    t.flows = <FlowEntry *>c25_zalloc(capacity * sizeof(FlowEntry))
    t.buckets = <int32_t *>malloc(nb * sizeof(int32_t))
    t.ring = <FlowEventRec *>c25_zalloc(ring_cap * sizeof(FlowEventRec))
    if t.flows == NULL or t.buckets == NULL or t.ring == NULL:
        c25_zfree(t.flows, capacity * sizeof(FlowEntry))
        free(t.buckets)
        c25_zfree(t.ring, ring_cap * sizeof(FlowEventRec))
        free(t)
        return NULL
    memset(t.buckets, 0xFF, nb * sizeof(int32_t))  # all -1
    t.free_head = -1
    t.fresh = 0
    t.lru_head = -1
    t.lru_tail = -1
    t.bucket_mask = nb - 1
    t.capacity = capacity
    t.idle_ms = idle_ms
    t.seed = seed
    t.ring_cap = ring_cap
    pthread_mutex_init(&t.lock, NULL)
    return t


cdef void ft_free(FlowTableC *t) noexcept nogil:
    """Release a table. No other thread may still be using it."""
    if t == NULL:
        return
    pthread_mutex_destroy(&t.lock)
    c25_zfree(t.flows, t.capacity * sizeof(FlowEntry))
    free(t.buckets)
    c25_zfree(t.ring, t.ring_cap * sizeof(FlowEventRec))
    free(t)


cdef bint ft_lookup(FlowTableC *t, const FlowKey *key, uint64_t now, uint32_t nbytes,
                    FlowHit *out) noexcept nogil:
    """Find the flow one of whose keys is `key`; copy its action for that
    direction into `out`, count the packet (`nbytes` long) and mark the flow
    used. A flow found idle for idle_ms or more is removed (reason idle) and
    the lookup misses, so expiry does not depend on how often ft_sweep runs."""
    cdef FlowKey k
    _ft_key_norm(key, &k)
    pthread_mutex_lock(&t.lock)
    now = _ft_tick(t, now)
    cdef int32_t s = _ft_find(t, &k)
    if s < 0:
        t.misses += 1
        pthread_mutex_unlock(&t.lock)
        return False
    cdef int32_t i = s >> 1
    cdef int d = s & 1
    cdef FlowEntry *e = &t.flows[i]
    if now - e.last_used >= t.idle_ms:
        _ft_remove(t, i, FT_R_IDLE)
        t.misses += 1
        pthread_mutex_unlock(&t.lock)
        return False
    e.last_used = now
    e.packets += 1
    e.bytes += nbytes
    if t.lru_head != i:
        _ft_lru_unlink(t, i)
        _ft_lru_push(t, i)
    memset(&out.act, 0, sizeof(FlowAction))
    out.act.rewrite = e.rewrite[d]
    memcpy(out.act.addr, _ft_addr(e, e.addr_of[d]), 16)
    memcpy(out.transit, _ft_addr(e, e.addr_of[2]), 16)
    out.peer = e.peer
    out.app = e.app
    out.dir = <uint8_t>d
    out.family = k.family
    t.hits += 1
    pthread_mutex_unlock(&t.lock)
    return True


cdef int ft_insert(FlowTableC *t, const FlowKey *fwd, const FlowAction *fwd_act,
                   const FlowKey *rev, const FlowAction *rev_act, uint32_t peer,
                   const uint8_t *transit, uint32_t app, uint64_t now) noexcept nogil:
    """Install a flow. Any flow holding `fwd` or `rev` (in either of its
    directions) is removed first (reason collision: up to two flows); then, if
    the table is full, the least recently used flow (reason lru). Emits one
    created event. Returns the flow's index, -1 if the two keys are equal or
    their families differ, or -2 if an action's address or the transit IP is
    none of the keys' addresses (nothing changed). `transit` is 16 bytes."""
    cdef FlowKey kf, kr
    _ft_key_norm(fwd, &kf)
    _ft_key_norm(rev, &kr)
    if _ft_key_eq(&kf, &kr) or kf.family != kr.family:
        return -1
    cdef int a_fwd = _ft_addr_index(&kf, &kr, fwd_act.addr)
    cdef int a_rev = _ft_addr_index(&kf, &kr, rev_act.addr)
    cdef int a_tr = _ft_addr_index(&kf, &kr, transit)
    if a_fwd < 0 or a_rev < 0 or a_tr < 0:
        return -2
    pthread_mutex_lock(&t.lock)
    now = _ft_tick(t, now)
    cdef int32_t s = _ft_find(t, &kf)
    if s >= 0:
        _ft_remove(t, s >> 1, FT_R_COLLISION)
    s = _ft_find(t, &kr)
    if s >= 0:
        _ft_remove(t, s >> 1, FT_R_COLLISION)
    if t.count == t.capacity:
        _ft_remove(t, t.lru_tail, FT_R_LRU)
    # count < capacity here: a removed entry, else one never used.
    cdef int32_t i = t.free_head
    if i >= 0:
        t.free_head = t.flows[i].next
    else:
        i = <int32_t>t.fresh
        t.fresh += 1
    cdef FlowEntry *e = &t.flows[i]
    memcpy(&e.key[FT_DIR_FWD], &kf, sizeof(FlowKey))
    memcpy(&e.key[FT_DIR_REV], &kr, sizeof(FlowKey))
    e.rewrite[FT_DIR_FWD] = fwd_act.rewrite
    e.rewrite[FT_DIR_REV] = rev_act.rewrite
    e.addr_of[FT_DIR_FWD] = <uint8_t>a_fwd
    e.addr_of[FT_DIR_REV] = <uint8_t>a_rev
    e.addr_of[2] = <uint8_t>a_tr
    e.peer = peer
    e.app = app
    e.created = now
    e.last_used = now
    e.packets = 0
    e.bytes = 0
    _ft_link_key(t, i * 2)
    _ft_link_key(t, i * 2 + 1)
    _ft_lru_push(t, i)
    t.count += 1
    t.inserts += 1
    _ft_emit(t, e, FT_EV_CREATED, FT_R_NEW)
    pthread_mutex_unlock(&t.lock)
    return i


cdef bint ft_delete(FlowTableC *t, const FlowKey *key) noexcept nogil:
    """Remove the flow holding `key` in either direction (reason delete)."""
    cdef FlowKey k
    _ft_key_norm(key, &k)
    pthread_mutex_lock(&t.lock)
    cdef int32_t s = _ft_find(t, &k)
    if s >= 0:
        _ft_remove(t, s >> 1, FT_R_DELETE)
    pthread_mutex_unlock(&t.lock)
    return s >= 0


cdef int ft_sweep(FlowTableC *t, uint64_t now, int limit) noexcept nogil:
    """Remove up to `limit` flows idle for idle_ms or more (reason idle),
    least recently used first; returns how many. The LRU list is ordered by
    last use, so this stops at the first flow still active."""
    cdef int n = 0
    cdef int32_t i
    pthread_mutex_lock(&t.lock)
    now = _ft_tick(t, now)
    while n < limit:
        i = t.lru_tail
        if i < 0 or now - t.flows[i].last_used < t.idle_ms:
            break
        _ft_remove(t, i, FT_R_IDLE)
        n += 1
    pthread_mutex_unlock(&t.lock)
    return n


cdef uint32_t ft_clear(FlowTableC *t) noexcept nogil:
    """Remove every flow (reason clear, one event each); returns how many."""
    cdef uint32_t n = 0
    pthread_mutex_lock(&t.lock)
    while t.lru_tail >= 0:
        _ft_remove(t, t.lru_tail, FT_R_CLEAR)
        n += 1
    pthread_mutex_unlock(&t.lock)
    return n


cdef uint32_t ft_drain(FlowTableC *t, FlowEventRec *out, uint32_t max_events) noexcept nogil:
    """Move up to `max_events` pending events, oldest first, into `out`."""
    cdef uint32_t n = 0
    pthread_mutex_lock(&t.lock)
    while n < max_events and t.ring_len > 0:
        memcpy(&out[n], &t.ring[t.ring_start], sizeof(FlowEventRec))
        t.ring_start = (t.ring_start + 1) % t.ring_cap
        t.ring_len -= 1
        n += 1
    if t.ring_len == 0:
        t.ring_start = 0  # keep to the ring's first (resident) records
    pthread_mutex_unlock(&t.lock)
    return n


cdef uint32_t ft_len(FlowTableC *t) noexcept nogil:
    pthread_mutex_lock(&t.lock)
    cdef uint32_t n = t.count
    pthread_mutex_unlock(&t.lock)
    return n


# ---- Python boundary (control plane and tests) -----------------------------

from collections import namedtuple as _namedtuple

FlowMatch = _namedtuple("FlowMatch", "direction rewrite addr peer transit app")
FlowMatch.__doc__ = """A flow-table hit: direction ('fwd'/'rev') of the matched key, the
rewrite for this packet ('src'/'dst' and the new address), and the flow's data."""

FlowEvent = _namedtuple(
    "FlowEvent", "kind reason transit peer key app created last_used packets bytes")
FlowEvent.__doc__ = """A flow-table event: kind 'created' (reason 'new') or 'removed'
(reason 'collision', 'lru', 'idle', 'delete' or 'clear'); key is the forward key as
(proto, src, sport, dst, dport); times in ms; packets/bytes over both directions."""

_FT_REASONS = ("new", "collision", "lru", "idle", "delete", "clear")


cdef int _ft_key_in(object key, FlowKey *out, str what) except -1:
    try:
        proto, src, sport, dst, dport = key
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected (proto, src, sport, dst, dport), got {key!r}")
    memset(out, 0, sizeof(FlowKey))
    cdef int fs = cv_addr_in(src, out.src, what + " src")
    cdef int fd = cv_addr_in(dst, out.dst, what + " dst")
    if fs != fd:
        raise ValueError(f"{what}: src and dst are of different address families")
    if not 0 <= proto <= 255:
        raise ValueError(f"{what}: proto {proto!r} not in 0..255")
    if not 0 <= sport <= 65535 or not 0 <= dport <= 65535:
        raise ValueError(f"{what}: ports {sport!r}, {dport!r} not in 0..65535")
    out.family = <uint8_t>fs
    out.proto = <uint8_t>proto
    out.sport = <uint16_t>sport
    out.dport = <uint16_t>dport
    return 0


cdef tuple _ft_key_out(const FlowKey *k):
    return (k.proto, cv_addr_out(k.src, k.family), k.sport,
            cv_addr_out(k.dst, k.family), k.dport)


cdef int _ft_action_in(object action, FlowAction *out, int family, str what) except -1:
    try:
        rewrite, addr = action
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected ('src' | 'dst', address), got {action!r}")
    memset(out, 0, sizeof(FlowAction))
    if rewrite == "src":
        out.rewrite = FT_REWRITE_SRC
    elif rewrite == "dst":
        out.rewrite = FT_REWRITE_DST
    else:
        raise ValueError(f"{what}: rewrite must be 'src' or 'dst', got {rewrite!r}")
    if cv_addr_in(addr, out.addr, what) != family:
        raise ValueError(f"{what}: address family differs from the flow's")
    return 0


cdef class FlowTable:
    """The flow table, for the control plane and tests.

    FlowTable(capacity, idle_timeout_ms=300_000, ring_size=None, seed=None)

    Keys are (proto, src, sport, dst, dport) with packed addresses (bytes of 4
    or 16, or ipaddress objects); actions are ('src' | 'dst', new address).
    All times are milliseconds of a monotonic clock. ring_size is how many
    events can wait for drain_events() (default capacity + 1024, so a clear
    after a drain never drops any); seed keys the hash (default: random).
    The pumps use the C API (ft_*) on `.table` directly, without the GIL.
    """

    cdef FlowTableC *table

    def __cinit__(self, capacity: int, idle_timeout_ms: int = 300_000,
                  ring_size: int | None = None, seed: int | None = None) -> None:
        if not 1 <= capacity <= FT_MAX_CAPACITY:
            raise ValueError(f"FlowTable capacity must be in 1..{FT_MAX_CAPACITY}, "
                             f"got {capacity!r}")
        if not 1 <= idle_timeout_ms < 2**63:
            raise ValueError(f"FlowTable idle_timeout_ms must be > 0, got {idle_timeout_ms!r}")
        if ring_size is None:
            ring_size = capacity + 1024
        if not 1 <= ring_size < 2**31:
            raise ValueError(f"FlowTable ring_size must be in 1..2**31-1, got {ring_size!r}")
        if seed is None:
            import os
            seed = int.from_bytes(os.urandom(8), "little")
        self.table = ft_new(capacity, idle_timeout_ms, ring_size, seed & 0xFFFFFFFFFFFFFFFF)
        if self.table == NULL:
            raise MemoryError(f"FlowTable: cannot allocate {capacity} flows")

    def __dealloc__(self) -> None:
        ft_free(self.table)
        self.table = NULL

    @property
    def capacity(self) -> int:
        return self.table.capacity

    @property
    def idle_timeout_ms(self) -> int:
        return self.table.idle_ms

    def insert(self, fwd: object, fwd_action: object, rev: object, rev_action: object,
               peer: int, transit: object, now: int, app: int = 0) -> int:
        """Install a flow (see ft_insert); returns its index. Flows sharing a
        key with it, and the LRU flow if full, are removed first."""
        cdef FlowKey kf, kr
        cdef FlowAction af, ar
        cdef uint8_t tr[16]
        _ft_key_in(fwd, &kf, "forward key")
        _ft_key_in(rev, &kr, "reverse key")
        if kf.family != kr.family:
            raise ValueError("forward and reverse keys are of different address families")
        _ft_action_in(fwd_action, &af, kf.family, "forward action")
        _ft_action_in(rev_action, &ar, kf.family, "reverse action")
        if cv_addr_in(transit, tr, "transit") != kf.family:
            raise ValueError("transit address family differs from the flow's")
        if not 0 <= peer <= 0xFFFFFFFF or not 0 <= app <= 0xFFFFFFFF:
            raise ValueError(f"peer {peer!r} and app {app!r} must fit in uint32")
        cdef uint32_t p = peer, a = app
        cdef uint64_t t_now = cv_ms_in(now, "now")
        cdef int i
        with nogil:
            i = ft_insert(self.table, &kf, &af, &kr, &ar, p, tr, a, t_now)
        if i == -2:
            raise ValueError("a flow's actions and transit IP must be addresses of its keys")
        if i < 0:
            raise ValueError("forward and reverse keys must differ")
        return i

    def lookup(self, key: object, now: int, nbytes: int = 0) -> object:
        """FlowMatch for the flow holding `key`, or None. Counts as use."""
        cdef FlowKey k
        cdef FlowHit h
        _ft_key_in(key, &k, "key")
        if not 0 <= nbytes <= 0xFFFFFFFF:
            raise ValueError(f"nbytes {nbytes!r} must fit in uint32")
        cdef uint64_t t_now = cv_ms_in(now, "now")
        cdef uint32_t nb = nbytes
        cdef bint found
        with nogil:
            found = ft_lookup(self.table, &k, t_now, nb, &h)
        if not found:
            return None
        return FlowMatch(
            "fwd" if h.dir == FT_DIR_FWD else "rev",
            "src" if h.act.rewrite == FT_REWRITE_SRC else "dst",
            cv_addr_out(h.act.addr, h.family), h.peer,
            cv_addr_out(h.transit, h.family), h.app)

    def delete(self, key: object) -> bool:
        """Remove the flow holding `key` (either direction); False if none."""
        cdef FlowKey k
        _ft_key_in(key, &k, "key")
        cdef bint found
        with nogil:
            found = ft_delete(self.table, &k)
        return found

    def sweep(self, now: int, limit: int = 1000) -> int:
        """Expire up to `limit` idle flows; returns how many."""
        if not 0 <= limit < 2**31:
            raise ValueError(f"limit must be in 0..2**31-1, got {limit!r}")
        cdef uint64_t t_now = cv_ms_in(now, "now")
        cdef int lim = limit, n
        with nogil:
            n = ft_sweep(self.table, t_now, lim)
        return n

    def clear(self) -> int:
        """Remove every flow, one 'clear' event each; returns how many."""
        cdef uint32_t n
        with nogil:
            n = ft_clear(self.table)
        return n

    def __len__(self) -> int:
        cdef uint32_t n
        with nogil:
            n = ft_len(self.table)
        return n

    def drain_events(self, max_events: int | None = None) -> list:
        """Take the pending events (oldest first) as FlowEvent tuples, at most
        the ring's size or `max_events`. The Python objects are built after
        the table's lock is released, a bounded chunk at a time (the copy
        buffer is small, whatever the ring's size)."""
        cdef uint32_t cap = self.table.ring_cap
        if max_events is not None:
            if max_events < 0:
                raise ValueError(f"max_events must be >= 0, got {max_events!r}")
            cap = min(cap, max_events)
        cdef FlowEventRec buf[_FT_DRAIN_CHUNK]
        cdef uint32_t n, j, want
        cdef FlowEventRec *r
        out = []
        while cap > 0:
            want = min(cap, <uint32_t>_FT_DRAIN_CHUNK)
            with nogil:
                n = ft_drain(self.table, buf, want)
            for j in range(n):
                r = &buf[j]
                out.append(FlowEvent(
                    "created" if r.kind == FT_EV_CREATED else "removed",
                    _FT_REASONS[r.reason], cv_addr_out(r.transit, r.key.family), r.peer,
                    _ft_key_out(&r.key), r.app, r.created, r.last_used, r.packets, r.bytes))
            cap -= n
            if n < want:
                break
        return out

    def stats(self) -> dict:
        """Counters: flows, capacity, inserts, hits, misses, events_pending,
        events_dropped, and removed_<reason> per removal reason."""
        cdef FlowTableC *t = self.table
        cdef FlowTableC c
        with nogil:
            pthread_mutex_lock(&t.lock)
            memcpy(&c, t, sizeof(FlowTableC))
            pthread_mutex_unlock(&t.lock)
        d = {"flows": c.count, "capacity": c.capacity, "inserts": c.inserts, "hits": c.hits,
             "misses": c.misses, "events_pending": c.ring_len,
             "events_dropped": c.events_dropped}
        for j in range(1, FT_NREASONS):
            d["removed_" + _FT_REASONS[j]] = c.removed[j]
        return d

    def memory(self) -> dict:
        """Sizes of the C arrays: bytes per flow entry and per event record, how
        many entries were ever used (the entry array's resident part), the
        event ring's capacity, and the hash buckets (4 bytes each)."""
        cdef FlowTableC *t = self.table
        cdef uint32_t used
        with nogil:
            pthread_mutex_lock(&t.lock)
            used = t.fresh
            pthread_mutex_unlock(&t.lock)
        return {"entry_bytes": sizeof(FlowEntry), "event_bytes": sizeof(FlowEventRec),
                "entries_used": used, "capacity": t.capacity, "ring_size": t.ring_cap,
                "buckets": t.bucket_mask + 1}
