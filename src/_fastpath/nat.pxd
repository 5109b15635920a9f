# NAT (prefix nat_): address rewriting with incremental checksum updates (RFC 1624 via
# cs_replace), translation of ICMP errors about a translated flow, and the
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
# router's frag-needed about C->R is found by the key R->C (pk_error_flow_key),
# whose action is "src R -> T"; the quote's dst R becomes T, the router stays
# the outer source. Every 16-bit field we touch in
# the quote (address, inner IPv4 header checksum, inner L4 checksum) sits at
# an even offset from the start of the ICMP message, so the outer ICMP
# checksum is fixed incrementally, word for word, as each of them changes.
#
# Parsed is the packet as parsed: these functions change the bytes, never
# pk.key / pk.inner, and they assume pk came from a PARSE_OK parse of p.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:  # which address; the same values as flowtable.pxd's FT_REWRITE_SRC/DST
    NAT_SRC = 1
    NAT_DST = 2

cdef enum:
    FRAG_SLOTS = 1024       # power of two
    FRAG_PROBE = 8          # slots examined per insert/lookup (a full window evicts its oldest)



cdef void nat_rewrite_addr(uint8_t *p, const Parsed *pk, int which,
                           const uint8_t *new_addr) noexcept nogil
cdef int nat_rewrite_icmp_error(uint8_t *p, Parsed *pk, const uint8_t *inner_old,
                                const uint8_t *inner_new, int which_inner) noexcept nogil
cdef int nat_apply(uint8_t *p, Parsed *pk, int which, const uint8_t *new_addr) noexcept nogil


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


cdef void nat_frag_init(FragTable *t, uint64_t timeout_ms) noexcept nogil
cdef int nat_frag_remember(FragTable *t, const Parsed *pk, int which, const uint8_t *new_addr,
                           uint64_t now) noexcept nogil
cdef int nat_frag_lookup(const FragTable *t, const Parsed *pk, uint64_t now, int *which,
                         uint8_t *new_addr) noexcept nogil
