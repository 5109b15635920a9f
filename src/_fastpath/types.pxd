# Types and helpers every concern shares (prefix c25_): the flow key, the
# 16-byte address form, hashing, and zeroed page allocation.
#
# Addresses are kept as 16 bytes for both families (IPv4 in the first 4
# bytes, the rest zero) so that one key layout serves v4 and v6 flows and
# tables can hash and compare keys with memcmp.

from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset


cdef struct FlowKey:
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t sport      # host byte order; ICMP/ICMPv6 echo: the identifier
    uint16_t dport      # host byte order; ICMP/ICMPv6 echo: the identifier too
    uint8_t family      # 4 or 6
    uint8_t proto       # IPPROTO_TCP 6, UDP 17, ICMP 1, ICMPV6 58
    uint8_t _pad[2]     # zeroed, so memcmp/hash over the struct is stable


cdef struct TbEndpoint:         # an underlay address (16-byte form) and UDP port
    uint8_t addr[16]
    uint16_t port
    uint8_t family              # 4 or 6; 0: none


cdef inline void c25_addr16(uint8_t *out, const uint8_t *a, uint8_t family) noexcept nogil:
    """An address of `family` as the 16-byte form above."""
    memset(out, 0, 16)
    memcpy(out, a, 4 if family == 4 else 16)


cdef inline uint64_t c25_mix(uint64_t h) noexcept nogil:
    # murmur3's 64-bit finaliser: every input bit affects every output bit.
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef inline uint64_t c25_hash_words(const uint8_t *p, int nwords, uint64_t seed) noexcept nogil:
    """Hash of nwords 8-byte words at p (any alignment), keyed by seed."""
    cdef uint64_t h = seed ^ 0x9e3779b97f4a7c15ULL
    cdef uint64_t w
    cdef int i
    for i in range(nwords):
        memcpy(&w, p + 8 * i, 8)  # no alignment assumption
        h = c25_mix(h ^ w)
    return h


# Big zeroed arrays (flow entries, event rings, table slots): fresh anonymous
# pages, resident only once touched, returned to the system when freed.
cdef void *c25_zalloc(size_t size) noexcept nogil
cdef void c25_zfree(void *p, size_t size) noexcept nogil
