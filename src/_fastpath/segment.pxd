# Packets out of the TUN device (prefix sg_): TSO/USO super-packets split in
# software, partial checksums completed.
#
# With TUN offloads on (TUNSETOFFLOAD with TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6,
# and TUN_F_USO4|TUN_F_USO6 where the kernel has them), the local stack hands
# the TUN device TCP (and UDP) super-packets of up to 64 KiB behind a
# virtio-net header, and plain packets whose TCP/UDP checksum is only
# partial. The overlay carries one IP packet per WireGuard message, so the
# pump splits each super-packet into the packets the kernel itself would
# have sent had the device not offered TSO (tcp_gso_segment /
# __udp_gso_segment / inet_gso_segment):
#
# * TCP: each segment carries a copy of the IP and TCP headers (options
#   included) and gso_size bytes of payload (the last one what is left); the
#   sequence number advances by gso_size per segment; FIN and PSH stay only
#   on the last segment, CWR only on the first; every other header field is
#   copied.
# * UDP (USO): each datagram carries a copy of the IP and UDP headers, gso_size
#   bytes of payload (the last one what is left) and its own UDP length.
# * IPv4: total length per segment, the ID incremented by one per segment
#   from the super-packet's (the kernel's TSO without fixed IDs), header
#   checksum recomputed. IPv6: payload length per segment.
# * Checksums: computed in full for every segment from its bytes (the
#   pseudo-header, header and payload), never carried over, so whatever was
#   in the super-packet's checksum field (a partial sum, or one fixed
#   incrementally by NAT) does not matter. A UDP checksum that comes out as 0
#   is sent as 0xFFFF; an IPv4 UDP checksum of 0 in a super-packet without
#   NEEDS_CSUM means "none" and stays 0.
# * A packet that is not GSO but has NEEDS_CSUM gets its partial checksum
#   completed in place (the sum from csum_start to its end, stored at
#   csum_start + csum_offset; 0 stored as 0xFFFF), as skb_checksum_help does.
#
# The header's hdr_len is not trusted: on the forwarding path the kernel puts
# the length of the packet's linear part there, which can be the whole first
# segment. Header lengths come from the packet itself; csum_start and
# csum_offset, when NEEDS_CSUM is set, must name the L4 checksum.
#
# Fail closed. What is split must be: IPv4 (options allowed, not a fragment)
# or IPv6 without extension headers, of the family the GSO type names, its
# protocol TCP (TCPV4/TCPV6) or UDP (UDP_L4), its IP length equal to the
# bytes read, complete L4 headers and a payload. Anything else, and a header
# with an unknown GSO type, flag, a gso_size of 0, checksum fields that do not
# fit the packet, is dropped and counted by reason (SG_E_*).
#
# Use: sg_parse() checks the header and packet (and completes the checksum
# of a non-GSO one); the caller may then rewrite addresses and ports in
# place (NAT: lengths and offsets stay); sg_next() writes one segment after
# the other, reading the super-packet's bytes as they are at that time.

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef enum:
    VNET_F_DATA_VALID = 2           # (header flags; NEEDS_CSUM is in coalesce.pxd)
    VNET_GSO_NONE = 0
    VNET_GSO_UDP_L4 = 5
    VNET_GSO_ECN = 0x80             # TCP: the first segment has CWR (ours copy it anyway)

cdef enum:  # sg_parse() results
    SG_PLAIN = 0                    # not GSO: the packet as it is (its checksum completed)
    SG_SPLIT = 1                    # a super-packet: call sg_next() until it returns 0
    SG_E_HEADER = -1                # the virtio-net header: unknown type or flag, gso_size 0,
                                    # checksum fields that do not fit the packet
    SG_E_PACKET = -2                # the packet does not fit its GSO type, or its lengths
                                    # contradict each other
    SG_E_UNSUPPORTED = -3           # well formed, but nothing we split (IPv6 extension headers)


cdef struct SgState:                # one super-packet being split
    const uint8_t *p                # the super-packet (its bytes read at each sg_next)
    Py_ssize_t n
    Py_ssize_t off                  # where the next segment's payload starts (0: done)
    uint32_t seq                    # TCP: the first segment's sequence number
    uint16_t l3len                  # IP header length
    uint16_t hlen                   # IP + TCP/UDP header length
    uint16_t gso_size
    uint16_t ip_id                  # IPv4: the first segment's ID
    uint16_t index                  # segments written so far
    uint8_t family
    uint8_t proto
    uint8_t no_csum                 # IPv4 UDP without checksum: keep 0


cdef int sg_parse(const uint8_t *vh, uint8_t *p, Py_ssize_t n, SgState *s) noexcept nogil
cdef Py_ssize_t sg_next(SgState *s, uint8_t *out) noexcept nogil


cdef inline Py_ssize_t sg_max_segment(const SgState *s) noexcept nogil:
    """The longest segment sg_next() may write for s."""
    return <Py_ssize_t>s.hlen + s.gso_size


cdef inline Py_ssize_t sg_count(const SgState *s) noexcept nogil:
    """How many segments s makes in all."""
    return (s.n - s.hlen + s.gso_size - 1) // s.gso_size
