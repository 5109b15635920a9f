# The Python-argument converters declared in convert.pxd.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef int cv_addr_in(object addr, uint8_t *out16, str what) except -1:
    """Copy a packed address (bytes-like of length 4 or 16, or an ipaddress
    object) zero-padded into out16; return its family (4 or 6)."""
    if hasattr(addr, "packed"):
        addr = addr.packed
    cdef const uint8_t[::1] mv
    try:
        mv = addr
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a packed address (bytes), got {type(addr).__name__}")
    cdef Py_ssize_t n = mv.shape[0]
    if n != 4 and n != 16:
        raise ValueError(f"{what}: address must be 4 or 16 bytes long, got {n}")
    memset(out16, 0, 16)
    memcpy(out16, &mv[0], n)
    return 4 if n == 4 else 6


cdef bytes cv_addr_of(object addr, uint8_t family, str what):
    """A packed address argument that must be of `family` (a packet's)."""
    cdef uint8_t a[16]
    cdef int fam = cv_addr_in(addr, a, what)
    if fam != family:
        raise ValueError(f"{what}: an IPv{family} packet needs a {4 if family == 4 else 16}-byte "
                         f"address, got {4 if fam == 4 else 16} bytes")
    return cv_addr_out(a, family)


cdef uint64_t cv_ms_in(object ms, str what) except? 0:
    """Milliseconds of the monotonic clock (or a duration): an integer >= 0."""
    if ms < 0:
        raise ValueError(f"{what} must be >= 0 (ms), got {ms!r}")
    return <uint64_t>ms


cdef uint32_t cv_u32_in(object v, str what) except? 0:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"{what} {v!r} must fit in uint32")
    return <uint32_t>v
