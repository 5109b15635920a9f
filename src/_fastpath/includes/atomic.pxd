# Atomic accesses for the few fields one thread reads while another writes
# them without a shared lock (event counts, the pumps' stop flag).

from libc.stdint cimport uint64_t


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
