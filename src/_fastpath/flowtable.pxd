# Flow table (prefix ft_): one entry per translated flow, found by either of two keys.
#
# A flow has a forward key (the first packet as it arrives from the
# originating side, before translation) and a reverse key (the reply as it
# arrives, before translation). Each key maps to the NAT action for its
# direction. The rules: the keys are independent; a new flow colliding on
# either key evicts the whole old flow; the table is LRU-bounded and a lookup
# from either side counts as use; idle flows expire; every removal (and every
# creation) is reported exactly once.
#
# Storage is C only: an array of FlowEntry, chained hashing with the
# chain links inside the entries (slot = flow index * 2 + direction), an
# intrusive doubly linked LRU list, and a free list. Nothing is allocated per
# packet or per flow.
#
# A flow is a translation: each action puts an address that one of the two
# keys holds (a DNAT's new destination is where the reply comes from; the
# reply's SNAT puts back the original destination), and so does the transit
# IP. An entry keeps which one, not a copy (144 bytes a flow instead of 192);
# ft_insert refuses a flow whose action or transit IP is none of them.
#
# Memory: the entry array and the event ring come zeroed straight from mmap
# (c25_zalloc) and nothing walks them up front, so their pages become
# resident only as flows and events first use them, and go back to the
# system when the table is freed, whatever malloc's thresholds are at the
# time: an idle table costs its hash buckets.
# Entries never used yet are taken in index order (`fresh`) once the free
# list of removed ones is empty; the ring restarts at its first record
# whenever a drain empties it, so a control plane that keeps up touches only
# the ring's first pages.
#
# Events are not callbacks: they are records appended to a C ring buffer under
# the table's lock and drained by the control plane later, so nothing
# reentrant ever runs under the lock. A full ring drops the event and counts
# it; the datapath never blocks on the control plane.
#
# Time: every `now` is uint64 MILLISECONDS of a monotonic clock, passed in by
# the caller. The table keeps the largest `now` it has seen and uses that, so
# two pump threads whose clock reads race cannot disorder the LRU list (which
# is then also ordered by last use, making idle sweeps O(expired)).
#
# Locking: one pthread mutex per table, held only for the short critical
# section of each call. Results are copied out under the lock, so a reader
# never sees a half-written entry.

from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from includes.pthread cimport pthread_mutex_t


cdef enum:
    FT_REWRITE_SRC = 1          # FlowAction.rewrite: replace the source address
    FT_REWRITE_DST = 2          # ... or the destination address

cdef enum:
    FT_DIR_FWD = 0              # FlowHit.dir: the forward key matched
    FT_DIR_REV = 1              # ... the reverse key matched

cdef enum:                      # FlowEntry.addr_of: key (direction) * 2 + (0 src, 1 dst)
    FT_ADDR_FWD_SRC = 0
    FT_ADDR_FWD_DST = 1
    FT_ADDR_REV_SRC = 2
    FT_ADDR_REV_DST = 3

cdef enum:
    FT_EV_CREATED = 1           # FlowEventRec.kind
    FT_EV_REMOVED = 2

cdef enum:
    FT_R_NEW = 0                # FlowEventRec.reason (FT_R_NEW only with FT_EV_CREATED)
    FT_R_COLLISION = 1          # displaced by a new flow sharing one of its keys
    FT_R_LRU = 2                # evicted to make room (capacity bound)
    FT_R_IDLE = 3               # not used for idle_ms
    FT_R_DELETE = 4             # ft_delete
    FT_R_CLEAR = 5              # ft_clear
    FT_NREASONS = 6

cdef enum:
    FT_MAX_CAPACITY = 1 << 29   # slot = index * 2 + dir must fit an int32


cdef struct FlowAction:
    uint8_t addr[16]            # the replacement address (IPv4: first 4 bytes, rest zero)
    uint8_t rewrite             # FT_REWRITE_SRC or FT_REWRITE_DST
    uint8_t _pad[3]

cdef struct FlowHit:            # what ft_lookup copies out
    FlowAction act              # the action for the matched direction
    uint8_t transit[16]         # the flow's transit IP
    uint32_t peer               # the flow's peer id
    uint32_t app                # the flow's app id
    uint8_t dir                 # FT_DIR_FWD or FT_DIR_REV
    uint8_t family              # 4 or 6

cdef struct FlowEventRec:
    FlowKey key                 # the flow's forward key
    uint8_t transit[16]
    uint64_t created            # ms
    uint64_t last_used          # ms
    uint64_t packets            # both directions, counted by ft_lookup
    uint64_t bytes
    uint32_t peer
    uint32_t app
    uint8_t kind                # FT_EV_*
    uint8_t reason              # FT_R_*

cdef struct FlowEntry:          # 144 bytes
    FlowKey key[2]              # [FT_DIR_FWD], [FT_DIR_REV]; normalised (zero padding)
    uint64_t created
    uint64_t last_used
    uint64_t packets            # both directions: all that the events and status show
    uint64_t bytes
    uint32_t peer
    uint32_t app
    int32_t hnext[2]            # hash chain link per key (slot numbers, -1 ends)
    int32_t prev                # LRU: towards the head (more recent), -1 at the head
    int32_t next                # LRU: towards the tail; free list link when removed
    uint8_t rewrite[2]          # the action per direction: FT_REWRITE_SRC or _DST
    uint8_t addr_of[3]          # the address the action of each direction puts, and the
                                # transit IP: which of the keys' four addresses (FT_ADDR_*)

cdef struct FlowTableC:
    pthread_mutex_t lock
    FlowEntry *flows
    int32_t *buckets            # head slot per bucket, -1 empty
    uint32_t bucket_mask
    uint32_t capacity
    uint32_t count
    int32_t free_head           # removed entries, linked by .next; -1 empty
    uint32_t fresh              # entries [fresh, capacity) were never used
    int32_t lru_head            # most recently used
    int32_t lru_tail            # least recently used
    uint64_t idle_ms
    uint64_t clock              # largest `now` seen (ms)
    uint64_t seed
    FlowEventRec *ring
    uint32_t ring_cap
    uint32_t ring_start
    uint32_t ring_len
    uint64_t emitted            # events ever queued in the ring (never reset)
    uint64_t inserts
    uint64_t hits
    uint64_t misses
    uint64_t events_dropped
    uint64_t removed[6]         # per FT_R_* reason


cdef FlowTableC *ft_new(uint32_t capacity, uint64_t idle_ms, uint32_t ring_cap,
                        uint64_t seed) noexcept nogil
cdef void ft_free(FlowTableC *t) noexcept nogil
cdef bint ft_lookup(FlowTableC *t, const FlowKey *key, uint64_t now, uint32_t nbytes,
                    FlowHit *out) noexcept nogil
cdef int ft_insert(FlowTableC *t, const FlowKey *fwd, const FlowAction *fwd_act,
                   const FlowKey *rev, const FlowAction *rev_act, uint32_t peer,
                   const uint8_t *transit, uint32_t app, uint64_t now) noexcept nogil
cdef bint ft_delete(FlowTableC *t, const FlowKey *key) noexcept nogil
cdef int ft_sweep(FlowTableC *t, uint64_t now, int limit) noexcept nogil
cdef uint32_t ft_clear(FlowTableC *t) noexcept nogil
cdef uint32_t ft_drain(FlowTableC *t, FlowEventRec *out, uint32_t max_events) noexcept nogil
cdef uint32_t ft_len(FlowTableC *t) noexcept nogil
