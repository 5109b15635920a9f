# Packets into the TUN device (prefix co_): software GRO and the virtio-net header.
#
# With IFF_VNET_HDR every packet read from or written to the TUN starts with a
# VNET_HDR-byte virtio-net header. We ask the kernel for no offloads on reads
# (TUNSETOFFLOAD is never called), so what we read is a plain packet behind a
# zero header. On writes we use the header for one thing: consecutive in-order
# TCP segments of one flow from one receive batch are joined into one
# super-packet (as the kernel's GRO would) and written once, marked GSO with
# the segment size and a partial checksum (NEEDS_CSUM, the pseudo-header sum
# in the checksum field); the kernel forwards or delivers it whole and splits
# it again only where it must. One write and one pass through the stack for
# up to CO_SEGS segments, instead of one per segment: the TUN write (and the
# stack run inside it) is most of what a received packet costs.
#
# Joined only: TCP with ACK and nothing of SYN, FIN, RST, URG, CWR, ECE;
# a payload; IPv4 without options, not a fragment, DF set; IPv6 without
# extension headers; the same addresses, ports, ack, window, TCP options,
# TOS/TTL (traffic class, flow label, hop limit); each segment's sequence
# number where the previous one ended; every segment as long as the first
# (the segment size) except the last, which may be shorter; PSH ends a
# super-packet, as does one shorter than the segment size. Anything else is
# written as it is, after what was pending, so the order stays the packets'.

from libc.stdint cimport uint8_t, uint16_t, uint32_t


cdef enum:
    VNET_HDR = 10                   # struct virtio_net_hdr (no num_buffers)
    VNET_F_NEEDS_CSUM = 1
    VNET_GSO_TCPV4 = 1
    VNET_GSO_TCPV6 = 4
    CO_SEGS = 64                    # segments per super-packet at most
    CO_MAX_PAYLOAD = 65535 - 40 - 60  # within an IPv4 total length / IPv6 payload length


cdef struct CoBuf:
    uint8_t *buf                    # VNET_HDR + 65536 bytes: header, then the super-packet
    Py_ssize_t len                  # bytes of the packet (0: nothing pending)
    uint32_t nseg
    uint32_t next_seq               # where the next segment must start
    uint16_t l3len                  # IP header length
    uint16_t l4len                  # TCP header length
    uint16_t mss                    # payload of the first segment
    uint8_t family
    uint8_t closed                  # nothing more may be appended (PSH, a short segment)


# The virtio-net header's fields are little-endian.
cdef inline uint16_t vnet_rd16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline void vnet_wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)


cdef int co_init(CoBuf *b) noexcept nogil
cdef void co_free(CoBuf *b) noexcept nogil
cdef bint co_push(CoBuf *b, int tun_fd, uint64_t *counters, const uint8_t *p,
                  Py_ssize_t n) noexcept nogil
cdef void co_flush(CoBuf *b, int tun_fd, uint64_t *counters) noexcept nogil
cdef bint co_write_plain(int tun_fd, uint64_t *counters, const uint8_t *p,
                         Py_ssize_t n, bint vnet) noexcept nogil
