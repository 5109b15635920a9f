# Python arguments in and out of the C structures (prefix cv_): the one set
# of converters every class of the extension uses, so that one kind of
# argument is checked one way, with one error message.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef int cv_addr_in(object addr, uint8_t *out16, str what) except -1
cdef bytes cv_addr_of(object addr, uint8_t family, str what)
cdef uint64_t cv_ms_in(object ms, str what) except? 0
cdef uint32_t cv_u32_in(object v, str what) except? 0


cdef inline bytes cv_addr_out(const uint8_t *a16, uint8_t family):
    """The packed address (4 or 16 bytes) of a 16-byte form."""
    return (<const char *>a16)[:4 if family == 4 else 16]
