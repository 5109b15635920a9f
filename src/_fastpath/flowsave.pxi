# Saved connector flows; why and which, and the record, are in flowsave.pxd.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from includes.pthread cimport pthread_mutex_lock, pthread_mutex_unlock

_FS_MAGIC = b"C25F\x01\x00\x00\x00"  # then SavedFlow records


cdef uint32_t _fs_copy_chunk(FlowTableC *t, uint32_t start, SavedFlow *out,
                             uint32_t *scanned) noexcept nogil:
    """Live flows among entries [start, start + FS_CHUNK) into out; their count."""
    cdef uint32_t i, n = 0, end
    cdef FlowEntry *e
    pthread_mutex_lock(&t.lock)
    end = start + FS_CHUNK
    if end > t.fresh:
        end = t.fresh
    for i in range(start, end):
        e = &t.flows[i]
        if e.key[FT_DIR_FWD].family == 0:
            continue
        memset(&out[n], 0, sizeof(SavedFlow))
        out[n].family = e.key[FT_DIR_FWD].family
        out[n].proto = e.key[FT_DIR_FWD].proto
        out[n].cport = e.key[FT_DIR_FWD].sport
        out[n].rport = e.key[FT_DIR_FWD].dport
        out[n].peer = e.peer
        out[n].app = e.app
        memcpy(out[n].client, e.key[FT_DIR_FWD].src, 16)
        memcpy(out[n].transit, e.key[FT_DIR_FWD].dst, 16)
        memcpy(out[n].real, _ft_addr(e, e.addr_of[FT_DIR_FWD]), 16)
        n += 1
    scanned[0] = end
    pthread_mutex_unlock(&t.lock)
    return n


cdef uint32_t fs_export(DpCore *d, SavedFlow *out, uint32_t cap) noexcept nogil:
    """The connector's flows whose return packets name no single transit IP,
    into out (at most cap); how many. The flow table's lock is held a chunk
    at a time, never together with the tables' lock."""
    cdef FlowTableC *t = d.connector_flows
    cdef SavedFlow chunk[<int>FS_CHUNK]
    cdef uint8_t tr[16]
    cdef uint32_t app, i, got, n = 0, pos = 0, next_pos
    if t == NULL:
        return 0
    while n < cap:
        got = _fs_copy_chunk(t, pos, chunk, &next_pos)
        for i in range(got):
            if (tb_return_transit(d.tables, chunk[i].family, chunk[i].peer, chunk[i].real,
                                  tr, &app) == TB_HIT
                    and memcmp(tr, chunk[i].transit, 16) == 0):
                continue  # its return packets re-create it
            if n < cap:
                out[n] = chunk[i]
                n += 1
        if next_pos <= pos or next_pos >= t.fresh:
            break
        pos = next_pos
    return n


cdef bint fs_restore_one(DpCore *d, const SavedFlow *f, uint64_t now) noexcept nogil:
    """Install one saved flow if its mapping still stands and still belongs to
    the same peer; whether it was installed."""
    cdef uint8_t real[16]
    cdef uint32_t app, peer
    cdef FlowKey fwd, rev
    cdef FlowAction fa, ra
    if d.connector_flows == NULL or (f.family != 4 and f.family != 6):
        return False
    if f.proto != 6 and f.proto != 17 and f.proto != 1 and f.proto != 58:
        return False
    if (tb_transit(d.tables, f.family, f.peer, f.transit, real, &app) != TB_HIT
            or memcmp(real, f.real, 16) != 0 or app != f.app
            or not tb_route(d.tables, f.family, f.client, &peer) or peer != f.peer):
        return False
    memset(&fwd, 0, sizeof(FlowKey))
    memset(&rev, 0, sizeof(FlowKey))
    memset(&fa, 0, sizeof(FlowAction))
    memset(&ra, 0, sizeof(FlowAction))
    fwd.family = rev.family = f.family
    fwd.proto = rev.proto = f.proto
    memcpy(fwd.src, f.client, 16)
    memcpy(fwd.dst, f.transit, 16)
    fwd.sport = f.cport
    fwd.dport = f.rport
    memcpy(rev.src, f.real, 16)
    memcpy(rev.dst, f.client, 16)
    rev.sport = f.rport
    rev.dport = f.cport
    fa.rewrite = FT_REWRITE_DST
    memcpy(fa.addr, f.real, 16)
    ra.rewrite = FT_REWRITE_SRC
    memcpy(ra.addr, f.transit, 16)
    return ft_insert(d.connector_flows, &fwd, &fa, &rev, &ra, peer, f.transit, app, now) >= 0


cdef bytes fs_save(DpCore *d, uint32_t cap):
    """fs_export as a blob (empty without flows to save); cap: the flow table's capacity."""
    cdef bint any_ambiguous
    with nogil:
        any_ambiguous = tb_any_ambiguous(d.tables)
    if not any_ambiguous:  # the common case, every sweep: no buffer, no scan
        return b""
    cdef SavedFlow *buf = <SavedFlow *>malloc(<size_t>cap * sizeof(SavedFlow))
    cdef uint32_t n
    if buf == NULL:
        raise MemoryError("Datapath.save_flows")
    try:
        with nogil:
            n = fs_export(d, buf, cap)
        if n == 0:
            return b""
        return _FS_MAGIC + (<char *>buf)[:n * sizeof(SavedFlow)]
    finally:
        free(buf)


cdef int fs_restore(DpCore *d, object data, uint64_t now) except -1:
    """fs_restore_one for each record of an fs_save blob; how many were installed."""
    cdef const uint8_t[::1] mv = data
    cdef Py_ssize_t n = len(data) - len(_FS_MAGIC)
    if n < 0 or data[:len(_FS_MAGIC)] != _FS_MAGIC or n % sizeof(SavedFlow):
        raise ValueError("not a saved-flows blob of this version")
    cdef const SavedFlow *recs = <const SavedFlow *>&mv[len(_FS_MAGIC)] if n else NULL
    cdef Py_ssize_t i, count = n // sizeof(SavedFlow)
    cdef int restored = 0
    with nogil:
        for i in range(count):
            restored += fs_restore_one(d, &recs[i], now)
    return restored
