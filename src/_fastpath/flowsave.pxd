# Saving and restoring (prefix fs_) the connector flows that a return packet cannot
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


cdef uint32_t fs_export(DpCore *d, SavedFlow *out, uint32_t cap) noexcept nogil
cdef bint fs_restore_one(DpCore *d, const SavedFlow *f, uint64_t now) noexcept nogil

# The Python side: the blob Datapath.save_flows() returns and restore_flows() takes.
cdef bytes fs_save(DpCore *d, uint32_t cap)
cdef int fs_restore(DpCore *d, object data, uint64_t now) except -1
