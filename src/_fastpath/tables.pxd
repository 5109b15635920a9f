# Mapping tables (prefix tb_) the pumps read per packet, written by the
# control plane.
#
# - routes:    (family, dst)              -> peer id. A peer's overlay addresses
#              (installed by tb_set_peer) and every transit IP registered with
#              that peer; the analogue of WireGuard's allowed IPs.
# - magic:     (family, magic IP)         -> transit IP            (client)
# - magic_rev: (family, transit IP)       -> magic IP              (client)
# - transit:   (family, T, peer id)       -> real IP + app id      (connector)
# - real_rev:  (family, R, peer id)       -> T + how many T map to R (connector)
#   A connector's mappings are keyed by the peer (its id), which the
#   datapath knows from the session a packet came in, not by the peer's
#   overlay address: an IPv6 key is then 20 bytes instead of 32.
#   The two reverse maps let a return packet re-create its flow after a
#   restart (the side that restarted lost its flow table, not its mappings);
#   each is kept in step with its forward map under the same lock.
# - local:     this node's own overlay addresses: what the overlay may reach
#   without translation, and the only untranslated sources sent to it.
# - peers:     peer id                    -> overlay addresses + WireGuard state
# - indices:   receiver index             -> peer id  (whose session is this datagram's?)
# - magic / transit ranges: tell "ours but unmapped" from "not our traffic".
#
# Storage is C only: open addressing with linear probing and backward-shift
# deletion (no tombstones), grown by doubling when more than 4/5 full. Each map
# is two of them: IPv4 keys in 32-byte slots (TbSlot4: the 4-byte addresses
# alone), IPv6 keys and ids in 56-byte ones (TbSlot6), so the IPv4 mappings a
# connector holds by the hundred thousand cost less than half of what one
# slot size for both families would. Callers build and read the wide forms
# (TbKey, TbVal); a found entry is a TbRef to its fields in place. The
# connector's mappings are kept here only: a transit entry also holds what the
# control plane needs of it (registration time, a number for its app and
# peer), which the control plane reads back (tb_transit_entry,
# Tables.transit_entries, expired_transit). A probe compares the stored hash
# before the key. Slot arrays come zeroed from mmap (c25_zalloc) and go back to
# the system when a map grows or is freed. One pthread mutex guards all tables
# of a Tables object, so
# an update that touches several maps (a peer and its routes) is atomic, and
# every lookup copies its result out under the lock: no packet sees half of
# an old and half of a new mapping. Lookups never allocate.
#
# Addresses in the C API are 16-byte buffers plus a family (4: only the first
# 4 bytes are read).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from includes.pthread cimport pthread_mutex_t


cdef enum:
    TB_NOT_OURS = 0             # tb_magic / tb_transit: outside every range
    TB_HIT = 1                  # mapped; result copied out
    TB_UNMAPPED = 2             # inside a magic / transit range but not mapped
    TB_AMBIGUOUS = 3            # tb_return_transit: several transit IPs map to that address

cdef enum:  # tb_del: which map
    TB_MAP_ROUTES = 0
    TB_MAP_MAGIC = 1

cdef enum:
    TB_MAX_OVERLAY = 8          # overlay addresses per peer
    TB_MAX_SLOTS = 1 << 30
    TB_MAX_LOCAL = 8            # own overlay addresses

cdef enum:
    TB_REV_STALE = 0x80000000   # real_rev: the remembered T was removed while others remain
    TB_REV_COUNT = 0x7FFFFFFF

cdef enum:
    TB_USED = 0x80000000        # the hash of a used slot has it; 0 is an empty slot
                                # (above every mask, so it never changes a home slot)


cdef struct TbKey:              # the wide form of a key, as callers build it
    uint8_t a[16]               # an address; the peers and indices maps: the uint32 id in
                                # the first 4 bytes
    uint8_t b[16]               # transit and real_rev: the uint32 peer id in the first 4 bytes
                                # (follows a: a and b[:4] are the 20-byte key of TbSlot6)
    uint8_t family              # 4: stored in a TbSlot4; 6, or 0 for an id: a TbSlot6
    uint8_t _pad[3]

cdef struct TbVal:              # the wide form of a value, copied in and out
    uint8_t addr[16]            # peers map: the TbPeer record (owned) instead, see _tb_val_ptr
    uint32_t u32
    uint32_t tag                # transit map: the control plane's number for the mapping's
                                # (app, peer name)
    double when                 # transit map: its last registration (wall-clock seconds)

cdef struct TbSlot4:            # 32 bytes: an entry whose key is of IPv4 addresses
    double when
    uint32_t hash               # _tb_hash | TB_USED, or 0: empty
    uint8_t key[8]              # TbKey.a[:4], TbKey.b[:4]
    uint8_t addr[4]
    uint32_t u32
    uint32_t tag

cdef struct TbSlot6:            # 56 bytes: an IPv6 key, or an id
    double when
    uint32_t hash
    uint8_t key[20]             # TbKey.a, TbKey.b[:4]
    uint8_t addr[16]
    uint32_t u32
    uint32_t tag

cdef struct TbHalf4:
    TbSlot4 *slots
    uint32_t mask               # slot count - 1 (a power of two)
    uint32_t count

cdef struct TbHalf6:
    TbSlot6 *slots
    uint32_t mask
    uint32_t count

cdef struct TbMap:
    TbHalf4 h4
    TbHalf6 h6

cdef struct TbEntry:            # an entry in the wide forms, as copied out for Python
    TbKey key
    TbVal val

cdef struct TbRef:              # a found entry's fields, in place (valid until the map changes)
    uint8_t *addr               # alen bytes
    uint32_t *u32
    uint32_t *tag
    double *when
    uint32_t index              # its slot in its half
    uint8_t alen                # 4: in the TbSlot4 half; 16: in the TbSlot6 half

cdef struct TbRange:
    uint8_t first[16]
    uint8_t last[16]
    uint8_t family

cdef struct TbPeer:
    SsPeer wg                   # its WireGuard sessions and endpoint (session.pxd)
    uint32_t n_overlay
    uint8_t ov_family[8]
    uint8_t ov_addr[8][16]

cdef struct TablesC:
    pthread_mutex_t lock
    uint64_t seed
    TbMap routes
    TbMap magic
    TbMap transit
    TbMap magic_rev
    TbMap real_rev
    TbMap peers
    TbMap indices               # WireGuard receiver index -> peer id (session.pxd)
    TbRange *magic_ranges
    uint32_t n_magic_ranges
    TbRange *transit_ranges
    uint32_t n_transit_ranges
    uint8_t local_family[<int>TB_MAX_LOCAL]
    uint8_t local_addr[<int>TB_MAX_LOCAL][16]
    uint32_t n_local
    uint32_t rev_ambiguous      # real_rev entries that name no single transit IP

cdef TablesC *tb_new(uint64_t seed) noexcept nogil
cdef void tb_free(TablesC *t) noexcept nogil
cdef bint tb_route(TablesC *t, uint8_t family, const uint8_t *dst, uint32_t *peer) noexcept nogil
cdef int tb_magic(TablesC *t, uint8_t family, const uint8_t *addr,
                  uint8_t *transit_out) noexcept nogil
cdef int tb_transit(TablesC *t, uint8_t family, uint32_t peer,
                    const uint8_t *transit, uint8_t *real_out, uint32_t *app_out) noexcept nogil
cdef bint tb_is_local(TablesC *t, uint8_t family, const uint8_t *addr) noexcept nogil
cdef bint tb_local_of(TablesC *t, uint8_t family, uint8_t *out) noexcept nogil
cdef bint tb_any_ambiguous(TablesC *t) noexcept nogil
cdef bint tb_magic_for_transit(TablesC *t, uint8_t family, const uint8_t *transit,
                               uint8_t *magic_out) noexcept nogil
cdef int tb_return_transit(TablesC *t, uint8_t family, uint32_t peer,
                           const uint8_t *real, uint8_t *transit_out,
                           uint32_t *app_out) noexcept nogil
cdef TbPeer *tb_peer_locked(TablesC *t, uint32_t peer) noexcept nogil
cdef bint tb_source_ok(TablesC *t, uint32_t peer, uint8_t family,
                       const uint8_t *src) noexcept nogil
cdef int tb_set_route(TablesC *t, uint8_t family, const uint8_t *dst, uint32_t peer) noexcept nogil
cdef int tb_set_magic(TablesC *t, uint8_t family, const uint8_t *magic,
                      const uint8_t *transit) noexcept nogil
cdef int tb_set_transit(TablesC *t, uint8_t family, uint32_t peer,
                        const uint8_t *transit, const uint8_t *real, uint32_t app,
                        uint32_t tag, double when) noexcept nogil
cdef bint tb_transit_entry(TablesC *t, uint8_t family, uint32_t peer,
                           const uint8_t *transit, TbVal *out) noexcept nogil
cdef int tb_set_local(TablesC *t, const uint8_t *families, const uint8_t (*addrs)[16],
                      uint32_t n) noexcept nogil
cdef bint tb_del(TablesC *t, int which, uint8_t family, const uint8_t *a) noexcept nogil
cdef bint tb_del_transit(TablesC *t, uint8_t family, uint32_t peer,
                         const uint8_t *transit) noexcept nogil
cdef TbRange *tb_swap_ranges(TablesC *t, bint transit, TbRange *ranges, uint32_t n,
                             uint32_t *old_n) noexcept nogil
cdef int tb_set_peer(TablesC *t, uint32_t peer, TbPeer *rec, TbPeer **old) noexcept nogil
cdef TbPeer *tb_del_peer(TablesC *t, uint32_t peer) noexcept nogil
