# Test probes: the parts of the per-packet code that the datapath does not
# expose on its own (parse status, NAT and fragment tracking on one packet),
# for the packet tests. Everything here is named _test_* (or _Test*): not
# part of the extension's API, not in _fastpath.pyi, never called by the
# daemon. They live in the one extension rather than a second one because
# they call its C functions directly; a test extension would need them
# exported or compiled twice.

from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


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


# WireGuard transport crypto (aead.pxd): the probes take and return bytes and copy them into
# a buffer of their own, with room for the tag, as the pumps' buffers have.

cdef const uint8_t *_aead_key(const uint8_t[::1] key) except NULL:
    if key.shape[0] != AEAD_KEY:
        raise ValueError(f"a key is {AEAD_KEY} bytes, got {key.shape[0]}")
    return &key[0]


cdef class _TestAead:
    """One AeadCtx, as one pump thread holds it: seal and open with any key, in any order."""

    cdef AeadCtx *c

    def __cinit__(self) -> None:
        self.c = aead_new()
        if self.c == NULL:
            raise MemoryError("_TestAead: aead_new failed")

    def __dealloc__(self) -> None:
        aead_free(self.c)

    def seal(self, const uint8_t[::1] key not None, uint64_t counter,
             const uint8_t[::1] plaintext not None) -> bytes:
        """ciphertext || tag, as aead_seal writes it in place."""
        cdef const uint8_t *k = _aead_key(key)
        cdef Py_ssize_t n = plaintext.shape[0]
        cdef bytearray out = bytearray(n + AEAD_TAG)
        cdef uint8_t[::1] mv = out
        cdef int rc
        if n:
            memcpy(&mv[0], &plaintext[0], n)
        with nogil:
            rc = aead_seal(self.c, k, counter, &mv[0], n)
        if rc != 0:
            raise RuntimeError("aead_seal failed")
        return bytes(out)

    def open(self, const uint8_t[::1] key not None, uint64_t counter,
             const uint8_t[::1] message not None) -> bytes | None:
        """The plaintext of ciphertext || tag, or None if aead_open refuses it."""
        cdef const uint8_t *k = _aead_key(key)
        cdef Py_ssize_t n = message.shape[0], m
        # One spare byte, so that even an empty message has an address to pass.
        cdef bytearray out = bytearray(n + 1)
        cdef uint8_t[::1] mv = out
        if n:
            memcpy(&mv[0], &message[0], n)
        with nogil:
            m = aead_open(self.c, k, counter, &mv[0], n)
        return None if m < 0 else bytes(out[:m])


def _test_aead_seal(key, uint64_t counter, plaintext) -> bytes:
    """aead_seal on a context of its own."""
    return _TestAead().seal(key, counter, plaintext)


def _test_aead_open(key, uint64_t counter, message) -> bytes | None:
    """aead_open on a context of its own."""
    return _TestAead().open(key, counter, message)


def _test_bench_aead(Py_ssize_t size, uint64_t iterations, bint opening=False) -> int:
    """ns that `iterations` seals (or opens) of a `size`-byte payload take, GIL released.

    One context and one key, a new counter per seal as a sender has; each open first copies
    in the one sealed message (memcpy of the buffer is part of the figure).
    """
    if size < 0 or size > 65535:
        raise ValueError(f"size must be 0..65535, got {size}")
    cdef uint8_t key[AEAD_KEY]
    cdef bytearray buf_ = bytearray(size + AEAD_TAG)
    cdef bytearray sealed_ = bytearray(size + AEAD_TAG)
    cdef uint8_t[::1] buf = buf_, sealed = sealed_
    cdef AeadCtx *c = aead_new()
    cdef timespec t0, t1
    cdef uint64_t i
    cdef bint ok = True
    if c == NULL:
        raise MemoryError("aead_new failed")
    memset(key, 7, AEAD_KEY)
    with nogil:
        if opening:
            ok = aead_seal(c, key, 1, &sealed[0], size) == 0
        clock_gettime(CLOCK_MONOTONIC, &t0)
        i = 0
        while ok and i < iterations:
            if opening:
                memcpy(&buf[0], &sealed[0], size + AEAD_TAG)
                ok = aead_open(c, key, 1, &buf[0], size + AEAD_TAG) == size
            else:
                ok = aead_seal(c, key, i, &buf[0], size) == 0
            i += 1
        clock_gettime(CLOCK_MONOTONIC, &t1)
    aead_free(c)
    if not ok:
        raise RuntimeError("aead_seal/aead_open failed")
    return (t1.tv_sec - t0.tv_sec) * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec)


cdef class _TestReplayWin:
    """One ReplayWin: fresh(counter) and accept(counter) as rw_fresh and rw_accept."""

    cdef ReplayWin *w

    def __cinit__(self) -> None:
        self.w = <ReplayWin *>calloc(1, sizeof(ReplayWin))
        if self.w == NULL:
            raise MemoryError("_TestReplayWin: cannot allocate its window")
        rw_init(self.w)

    def __dealloc__(self) -> None:
        free(self.w)

    def fresh(self, uint64_t counter) -> bool:
        return rw_fresh(self.w, counter)

    def accept(self, uint64_t counter) -> bool:
        return rw_accept(self.w, counter)

    @property
    def next(self) -> int:
        """One more than the highest counter accepted (0: none yet)."""
        return self.w.next


def _test_coalesce(packets: list, int fd) -> None:
    """Push `packets` (bytes) through the TUN-side coalescing as one receive batch, writing
    to `fd` (a datagram socket in tests: one message per write); flush at the end."""
    cdef CoBuf b
    cdef uint64_t counters[<int>C_NCOUNTERS]
    cdef bytearray buf
    cdef uint8_t *p
    if co_init(&b) < 0:
        raise MemoryError
    memset(counters, 0, sizeof(counters))
    try:
        for pkt in packets:
            buf = bytearray(VNET_HDR) + bytearray(pkt)
            p = buf
            co_push(&b, fd, counters, p + VNET_HDR, len(pkt))
        co_flush(&b, fd, counters)
    finally:
        co_free(&b)


_SG_REASONS = {SG_E_HEADER: "header", SG_E_PACKET: "packet", SG_E_UNSUPPORTED: "unsupported"}


def _test_segment(const uint8_t[::1] vnet_hdr not None, packet, translate=None) -> list | str:
    """What the TUN -> UDP pump makes of `packet` read behind the virtio-net header
    `vnet_hdr` (segment.pxd): the segments of a super-packet, or [the packet] with its
    partial checksum completed; or why it is dropped ('header', 'packet', 'unsupported').
    `translate` = ('src'|'dst', address): NAT the super-packet once in between, as the
    pump's dp_from_tun does (parse status other than ok: a ValueError)."""
    cdef SgState s
    cdef Parsed pk
    cdef bytearray buf = bytearray(packet)
    cdef Py_ssize_t n = len(buf), m
    cdef uint8_t *p
    cdef bytearray out
    cdef uint8_t *o
    cdef int rc
    if vnet_hdr.shape[0] != VNET_HDR:
        raise ValueError(f"a virtio-net header is {VNET_HDR} bytes, got {vnet_hdr.shape[0]}")
    buf += b"\0"  # an address even for an empty packet
    p = buf
    rc = sg_parse(&vnet_hdr[0], p, n, &s)
    if rc < 0:
        return _SG_REASONS[rc]
    if translate is not None:
        which, addr = translate
        if pk_parse(p, n, &pk) != PARSE_OK:
            raise ValueError("the packet does not parse: nothing to translate")
        nat_apply(p, &pk, _which_arg(which), cv_addr_of(addr, pk.key.family, "translate"))
    if rc == SG_PLAIN:
        return [bytes(buf[:n])]
    segs = []
    out = bytearray(sg_max_segment(&s))
    o = out
    while True:
        m = sg_next(&s, o)
        if m == 0:
            return segs
        segs.append(bytes(out[:m]))


def _test_queue_of(packet, int queues) -> int:
    """The TUN queue (of `queues`) the UDP -> TUN pump writes `packet` into (pump.pxd,
    "Queues")."""
    cdef bytes b = bytes(packet) + b"\0"  # an address even for an empty packet
    return pump_queue_of(<const uint8_t *>b, len(b) - 1, queues)
