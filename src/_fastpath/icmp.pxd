# ICMP "unreachable" generation (prefix icmp_) for a magic IP without an
# assignment: ICMPv4 type 3 code 1 (host unreachable) or ICMPv6 type 1 code 3 (address
# unreachable), from the magic IP back to the sender, written by the pump
# into the TUN.
#
# The reply quotes as much of the offending packet as fits in 576 bytes
# (IPv4, RFC 1812 4.3.2.3) or 1280 bytes (IPv6, RFC 4443 2.4(c)), and at
# least its IP header and 8 bytes of upper layer (RFC 792). No reply, per RFC
# 1122 3.2.2 and RFC 4443 2.4(e), to: an ICMP error (so two nodes can never
# bounce errors at each other), a later fragment (which tells the sender
# nothing it can match), or a packet from or to an address that is not one
# host (unspecified, loopback source, multicast, IPv4 broadcast/class E).

from libc.stdint cimport uint8_t


cdef enum:
    ICMP4_REPLY_MAX = 576
    ICMP6_REPLY_MAX = 1280
    UNREACH_BUF_SIZE = 1280     # an output buffer this large always holds the largest reply


cdef Py_ssize_t icmp_build_unreachable(const uint8_t *p, const Parsed *pk, uint8_t *out,
                                       Py_ssize_t cap) noexcept nogil
