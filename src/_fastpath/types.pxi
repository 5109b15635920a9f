# Zeroed page allocation (declared with the shared types in types.pxd).

from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap


cdef void *c25_zalloc(size_t size) noexcept nogil:
    """`size` zero bytes of fresh anonymous pages, or NULL. A page is resident
    only once touched. Free with c25_zfree and the same size."""
    if size == 0:
        size = 1
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    return NULL if p == MAP_FAILED else p


cdef void c25_zfree(void *p, size_t size) noexcept nogil:
    if p != NULL:
        munmap(p, size if size else 1)
