# C-level types shared by the datapath's include files.
#
# Addresses are kept as 16 bytes for both families (IPv4 in the first 4
# bytes, the rest zero) so that one key layout serves v4 and v6 flows and
# tables can hash and compare keys with memcmp.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap


cdef struct FlowKey:
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t sport      # host byte order; ICMP/ICMPv6 echo: the identifier
    uint16_t dport      # host byte order; ICMP/ICMPv6 echo: the identifier too
    uint8_t family      # 4 or 6
    uint8_t proto       # IPPROTO_TCP 6, UDP 17, ICMP 1, ICMPV6 58
    uint8_t _pad[2]     # zeroed, so memcmp/hash over the struct is stable


cdef inline void _addr16(uint8_t *out, const uint8_t *a, uint8_t family) noexcept nogil:
    """An address of `family` as the 16-byte form above."""
    memset(out, 0, 16)
    memcpy(out, a, 4 if family == 4 else 16)


# Atomic accesses for the few fields one thread reads while another writes
# them without a shared lock (event counts, the pumps' stop flag).
cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t c25_load_u64(const uint64_t *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int c25_load_int(const int *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void c25_store_int(int *p, int v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    uint64_t c25_load_u64(const uint64_t *p) nogil
    int c25_load_int(const int *p) nogil
    void c25_store_int(int *p, int v) nogil


# Big zeroed arrays (flow entries, event rings, table slots): fresh anonymous
# pages, resident only once touched, returned to the system when freed.

cdef void *zalloc_pages(size_t size) noexcept nogil:
    """`size` zero bytes of fresh anonymous pages, or NULL. A page is resident
    only once touched. Free with zfree_pages and the same size."""
    if size == 0:
        size = 1
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    return NULL if p == MAP_FAILED else p


cdef void zfree_pages(void *p, size_t size) noexcept nogil:
    if p != NULL:
        munmap(p, size if size else 1)
