# Test probes: the parts of the per-packet code that the datapath does not
# expose on its own (parse status, NAT and fragment tracking on one packet),
# for the packet tests. Everything here is named _test_* (or _Test*): not
# part of the extension's API, not in _fastpath.pyi, never called by the
# daemon. They live in the one extension rather than a second one because
# they call its C functions directly; a test extension would need them
# exported or compiled twice.

from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free


def _test_parse_status(const uint8_t[::1] data not None) -> str:
    """Why a packet would be dropped: 'ok', 'truncated', 'malformed' or 'unsupported'."""
    cdef Parsed pk
    return pk_status_name(pk_parse_view(data, &pk))


cdef int _which_arg(str which) except -1:
    if which == "src":
        return NAT_SRC
    if which == "dst":
        return NAT_DST
    raise ValueError(f"which must be 'src' or 'dst', got {which!r}")


def _test_nat_rewrite(data, str which, new_addr) -> bytes:
    """The packet with its outer source ('src') or destination ('dst') set to new_addr.

    Checksums are fixed incrementally; an ICMP error's quoted packet is left alone.
    """
    cdef Parsed pk
    cdef bytearray buf = pk_parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes a = cv_addr_of(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    nat_rewrite_addr(&mv[0], &pk, w, a)
    return bytes(buf)


def _test_nat_rewrite_icmp_inner(data, str which, old_addr, new_addr) -> bytes:
    """The ICMP error with its quoted packet's address `which` changed from old_addr to new_addr.

    ValueError if data is not an ICMP error with a usable quote holding old_addr there.
    """
    cdef Parsed pk
    cdef bytearray buf = pk_parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes old = cv_addr_of(old_addr, pk.key.family, "old_addr")
    cdef bytes new = cv_addr_of(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    if pk.kind != PKT_ICMP_ERROR or not (pk.flags & PKF_INNER):
        raise ValueError("not an ICMP error with a usable quoted packet")
    if not nat_rewrite_icmp_error(&mv[0], &pk, old, new, w):
        raise ValueError(f"the quoted packet's {which} address is not {old_addr}")
    return bytes(buf)


def _test_nat_translate(data, str which, new_addr) -> bytes | None:
    """Apply a flow action ("`which` address becomes new_addr") as the pumps do.

    For an ICMP error this rewrites its quoted packet's opposite address and the
    outer `which` address when it held the same old address. None for an ICMP
    error whose quote is unusable.
    """
    cdef Parsed pk
    cdef bytearray buf = pk_parsed_copy(data, &pk)
    cdef int w = _which_arg(which)
    cdef bytes new = cv_addr_of(new_addr, pk.key.family, "new_addr")
    cdef uint8_t[::1] mv = buf
    if not nat_apply(&mv[0], &pk, w, new):
        return None
    return bytes(buf)


cdef class _TestFragTracker:
    """One fragment-tracking table (the pumps own theirs at C level).

    _TestFragTracker(timeout_ms=30_000); every `now` is milliseconds of a monotonic clock.
    """

    cdef FragTable *t

    def __cinit__(self, timeout_ms: int = 30_000) -> None:
        self.t = <FragTable *>calloc(1, sizeof(FragTable))
        if self.t == NULL:
            raise MemoryError("_TestFragTracker: cannot allocate its table")
        nat_frag_init(self.t, cv_ms_in(timeout_ms, "timeout_ms"))

    def __dealloc__(self) -> None:
        free(self.t)

    def remember(self, first_fragment, str which, new_addr, now) -> bool:
        """Record the rewrite applied to a first fragment; False if it is not one."""
        cdef Parsed pk
        pk_parsed_copy(first_fragment, &pk)
        cdef int w = _which_arg(which)
        cdef bytes a = cv_addr_of(new_addr, pk.key.family, "new_addr")
        return bool(nat_frag_remember(self.t, &pk, w, a, cv_ms_in(now, "now")))

    def lookup(self, fragment, now) -> tuple | None:
        """('src'|'dst', packed new address) for a later fragment of a remembered one, else None."""
        cdef Parsed pk
        cdef int w = 0
        cdef uint8_t addr[16]
        pk_parsed_copy(fragment, &pk)
        if not nat_frag_lookup(self.t, &pk, cv_ms_in(now, "now"), &w, addr):
            return None
        return ("src" if w == NAT_SRC else "dst",
                (<const char *>addr)[:4 if pk.key.family == 4 else 16])

    def translate(self, fragment, now) -> bytes | None:
        """A later fragment rewritten as its first one was, or None if unknown."""
        cdef Parsed pk
        cdef int w = 0
        cdef uint8_t addr[16]
        cdef bytearray buf = pk_parsed_copy(fragment, &pk)
        cdef uint8_t[::1] mv = buf
        if not nat_frag_lookup(self.t, &pk, cv_ms_in(now, "now"), &w, addr):
            return None
        nat_rewrite_addr(&mv[0], &pk, w, addr)
        return bytes(buf)
