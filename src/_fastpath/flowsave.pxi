# Saving and restoring the connector flows that a return packet cannot
# re-create by itself.
#
# After a restart a connector re-creates a flow from its return packet when
# the pair (client overlay address, real address) names one transit IP of
# that client (datapath.pxi). When several transit IPs of one client map to
# one real address (two names of one CDN address), the return packet cannot
# say which, so those flows, and only those, are saved by the control plane
# now and then and restored at start. A record is only a hint: it is
# restored only while the mapping it came from still stands.
#
# The file is the node's own (same machine, host byte order): an 8-byte
# header then SavedFlow records.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset


cdef struct SavedFlow:      # 64 bytes
    uint8_t family
    uint8_t proto
    uint16_t cport          # the client's port
    uint16_t rport          # the server's port (a transit flow keeps ports)
    uint8_t _pad[2]
    uint32_t peer
    uint32_t app
    uint8_t client[16]
    uint8_t transit[16]
    uint8_t real[16]

cdef enum:
    FS_CHUNK = 1024         # entries looked at per hold of the flow table's lock

FLOWS_MAGIC = b"C25F\x01\x00\x00\x00"


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
        memcpy(out[n].real, e.act[FT_DIR_FWD].addr, 16)
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
            if (tb_return_transit(d.tables, chunk[i].family, chunk[i].client, chunk[i].real,
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
    if (tb_transit(d.tables, f.family, f.client, f.transit, real, &app) != TB_HIT
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
