# The pumps: two threads that move packets between the TUN device and the
# overlay's UDP socket, with the GIL released for their whole loop.
#
#   TUN -> UDP: read every packet that is ready (up to PUMP_BATCH), decide
#               each with dp_from_tun, send the batch with one sendmmsg.
#   UDP -> TUN: recvmmsg up to PUMP_BATCH datagrams, check the sender and
#               the inner source (DESIGN §2), decide with dp_from_overlay,
#               write each packet to the TUN device.
#
# Each batch slot is a PUMP_SLOT-byte buffer with DG_HDR bytes of headroom,
# so the datagram header is written in front of a TUN packet without a copy.
# Slots are large enough for a 64 KiB packet: TUN offloads (IFF_VNET_HDR with
# TSO/GRO) and UDP GSO/GRO can later hand the pumps super-packets without a
# change to the Python API — they would add a virtio-net header in the
# headroom and a segmentation step here.
#
# The datagram header (DG_HDR bytes): version (1), type (data, reject,
# keepalive), two reserved bytes (zero). A reject's payload is the address
# family (4 or 6) and the transit IP's 4 or 16 bytes.

from libc.errno cimport EINTR, errno
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read, write


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    struct sockaddr:
        pass
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr,
                   socklen_t alen)
    enum: AF_INET, AF_INET6, MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr
    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK, EFD_CLOEXEC


cdef enum:
    DG_VERSION = 1
    DG_DATA = 1
    DG_REJECT = 2
    DG_KEEPALIVE = 3
    DG_HDR = 4
    PUMP_BATCH = 64
    PUMP_SLOT = 65536 + 64


cdef struct SockAddr:       # big enough for either family
    sockaddr_in6 sa


cdef struct PumpBufs:
    uint8_t *data           # PUMP_BATCH * PUMP_SLOT bytes
    mmsghdr msgs[<int>PUMP_BATCH]
    iovec iovs[<int>PUMP_BATCH]
    SockAddr addrs[<int>PUMP_BATCH]


cdef inline uint64_t now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000


cdef inline socklen_t _sockaddr_out(SockAddr *out, int sock_family, const TbEndpoint *ep) noexcept nogil:
    """The sockaddr to send to `ep` on a socket of `sock_family` (0 if impossible)."""
    cdef sockaddr_in *s4 = <sockaddr_in *>&out.sa
    memset(out, 0, sizeof(SockAddr))
    if sock_family == AF_INET:
        if ep.family != 4:
            return 0
        s4.sin_family = AF_INET
        s4.sin_port = htons(ep.port)
        memcpy(&s4.sin_addr, ep.addr, 4)
        return sizeof(sockaddr_in)
    out.sa.sin6_family = AF_INET6
    out.sa.sin6_port = htons(ep.port)
    if ep.family == 4:  # v4-mapped, for a dual-stack socket
        out.sa.sin6_addr.s6_addr[10] = 0xFF
        out.sa.sin6_addr.s6_addr[11] = 0xFF
        memcpy(&out.sa.sin6_addr.s6_addr[12], ep.addr, 4)
    else:
        memcpy(out.sa.sin6_addr.s6_addr, ep.addr, 16)
    return sizeof(sockaddr_in6)


cdef inline uint8_t _sockaddr_in(const SockAddr *a, uint8_t *addr16, uint16_t *port) noexcept nogil:
    """Family (4/6, 0 if unknown), address and port of a datagram's sender."""
    cdef const sockaddr_in *s4 = <const sockaddr_in *>&a.sa
    cdef const uint8_t *b
    memset(addr16, 0, 16)
    if s4.sin_family == AF_INET:
        memcpy(addr16, &s4.sin_addr, 4)
        port[0] = ntohs(s4.sin_port)
        return 4
    if a.sa.sin6_family == AF_INET6:
        port[0] = ntohs(a.sa.sin6_port)
        b = a.sa.sin6_addr.s6_addr
        if (b[0] | b[1] | b[2] | b[3] | b[4] | b[5] | b[6] | b[7] | b[8] | b[9]) == 0 \
                and b[10] == 0xFF and b[11] == 0xFF:
            memcpy(addr16, b + 12, 4)
            return 4
        memcpy(addr16, b, 16)
        return 6
    return 0


cdef inline void _wake(int efd) noexcept nogil:
    cdef uint64_t one = 1
    write(efd, &one, 8)


cdef void _send_reject(DpCore *d, DpCtx *c, int udp_fd, int sock_family, uint64_t now) noexcept nogil:
    cdef uint8_t msg[DG_HDR + 1 + 16]
    cdef TbEndpoint ep
    cdef SockAddr sa
    cdef socklen_t alen
    cdef Py_ssize_t n = DG_HDR + 1 + (4 if c.family == 4 else 16)
    if not dp_reject_due(d, c, now) or not tb_peer_endpoint(d.tables, c.peer, &ep):
        return
    alen = _sockaddr_out(&sa, sock_family, &ep)
    if alen == 0:
        return
    msg[0] = DG_VERSION
    msg[1] = DG_REJECT
    msg[2] = 0
    msg[3] = 0
    msg[4] = c.family
    memcpy(msg + DG_HDR + 1, c.transit, n - DG_HDR - 1)
    if sendto(udp_fd, msg, n, MSG_DONTWAIT, <const sockaddr *>&sa, alen) < 0:
        c.counters[C_UDP_SEND_ERRORS] += 1
    else:
        c.counters[C_REJECTS_SENT] += 1


cdef void _flush(DpCtx *c, PumpBufs *b, int udp_fd, unsigned int n) noexcept nogil:
    cdef unsigned int done = 0
    cdef int r
    while done < n:
        r = sendmmsg(udp_fd, &b.msgs[done], n - done, 0)
        if r < 0:
            if errno == EINTR:
                continue
            # The first message failed (e.g. no route to that endpoint): skip it.
            c.counters[C_UDP_SEND_ERRORS] += 1
            done += 1
        else:
            c.counters[C_UDP_TX] += r
            done += r


cdef void pump_tun_to_udp(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                          int sock_family, int stop_fd, int event_fd) noexcept nogil:
    cdef pollfd fds[2]
    cdef unsigned int nout
    cdef Py_ssize_t r
    cdef uint8_t *slot
    cdef int verdict, i
    cdef TbEndpoint ep
    cdef socklen_t alen
    cdef uint64_t now
    fds[0].fd = tun_fd
    fds[0].events = POLLIN
    fds[1].fd = stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0 and errno != EINTR:
            break
        if fds[1].revents:
            break
        now = now_ms()
        nout = 0
        for i in range(PUMP_BATCH):
            slot = b.data + <Py_ssize_t>i * PUMP_SLOT
            r = read(tun_fd, slot + DG_HDR, PUMP_SLOT - DG_HDR)
            if r < 0:
                if errno == EINTR:
                    continue
                break  # EAGAIN: nothing more is ready
            if r == 0:
                break
            c.counters[C_TUN_RX] += 1
            verdict = dp_from_tun(d, c, slot + DG_HDR, r, now)
            if verdict == DP_REPLY:
                if write(tun_fd, c.reply, c.reply_len) < 0:
                    c.counters[C_TUN_WRITE_ERRORS] += 1
                else:
                    c.counters[C_TUN_TX] += 1
            elif verdict == DP_TO_PEER:
                if not tb_peer_endpoint(d.tables, c.peer, &ep):
                    c.counters[C_DROP_NO_ROUTE] += 1
                    continue
                alen = _sockaddr_out(&b.addrs[nout], sock_family, &ep)
                if alen == 0:
                    c.counters[C_DROP_NO_ROUTE] += 1
                    continue
                slot[0] = DG_VERSION
                slot[1] = DG_DATA
                slot[2] = 0
                slot[3] = 0
                b.iovs[nout].iov_base = slot
                b.iovs[nout].iov_len = r + DG_HDR
                b.msgs[nout].msg_hdr.msg_name = &b.addrs[nout]
                b.msgs[nout].msg_hdr.msg_namelen = alen
                b.msgs[nout].msg_hdr.msg_iov = &b.iovs[nout]
                b.msgs[nout].msg_hdr.msg_iovlen = 1
                b.msgs[nout].msg_hdr.msg_control = NULL
                b.msgs[nout].msg_hdr.msg_controllen = 0
                b.msgs[nout].msg_hdr.msg_flags = 0
                nout += 1
        if nout:
            _flush(c, b, udp_fd, nout)
        if dp_events_pending(d):
            _wake(event_fd)


cdef int dp_check_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n,
                           const SockAddr *sender, uint64_t now, Parsed *pk,
                           uint32_t *peer) noexcept nogil:
    """Header and sender checks for one datagram; for data, the inner packet is
    parsed into pk and its source checked. Returns the datagram type to act
    on, or 0 to drop (counted)."""
    cdef uint8_t addr[16]
    cdef uint16_t port
    cdef uint8_t fam = _sockaddr_in(sender, addr, &port)
    cdef int r
    c.counters[C_UDP_RX] += 1
    if fam == 0 or not tb_peer_by_endpoint(d.tables, fam, addr, port, peer):
        c.counters[C_DROP_UNKNOWN_PEER] += 1
        return 0
    if n < DG_HDR or dg[0] != DG_VERSION:
        c.counters[C_DROP_BAD_HEADER] += 1
        return 0
    if dg[1] == DG_KEEPALIVE:
        c.counters[C_KEEPALIVES_RECEIVED] += 1
        return DG_KEEPALIVE
    if dg[1] == DG_REJECT:
        if n != DG_HDR + 5 and n != DG_HDR + 17 or (dg[DG_HDR] != 4 and dg[DG_HDR] != 6) \
                or n != DG_HDR + 1 + (4 if dg[DG_HDR] == 4 else 16):
            c.counters[C_DROP_BAD_HEADER] += 1
            return 0
        c.counters[C_REJECTS_RECEIVED] += 1
        return DG_REJECT
    if dg[1] != DG_DATA:
        c.counters[C_DROP_BAD_HEADER] += 1
        return 0
    if _parse_counted(c, dg + DG_HDR, n - DG_HDR, pk) != PARSE_OK:
        return 0
    r = tb_check_inbound(d.tables, fam, addr, port, pk.key.family, pk.key.src, peer)
    if r != TB_IN_OK:
        c.counters[C_DROP_SPOOFED if r == TB_IN_SPOOFED else C_DROP_UNKNOWN_PEER] += 1
        return 0
    return DG_DATA


cdef int dp_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const SockAddr *sender,
                     uint64_t now, uint32_t *peer) noexcept nogil:
    """One datagram from the overlay: the verdict for its inner packet
    (DP_TO_TUN, DP_REJECT or DP_DROP); rejects received become events."""
    cdef Parsed pk
    cdef uint8_t transit[16]
    cdef int t = dp_check_datagram(d, c, dg, n, sender, now, &pk, peer)
    if t == DG_DATA:
        return dp_from_overlay(d, c, dg + DG_HDR, n - DG_HDR, peer[0], &pk, now)
    if t == DG_REJECT:
        memset(transit, 0, 16)
        memcpy(transit, dg + DG_HDR + 1, n - DG_HDR - 1)
        dp_push_event(d, DP_EV_REJECT, dg[DG_HDR], peer[0], transit)
    return DP_DROP


cdef void pump_udp_to_tun(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                          int sock_family, int stop_fd, int event_fd) noexcept nogil:
    cdef pollfd fds[2]
    cdef int got, i, verdict
    cdef uint8_t *slot
    cdef uint32_t peer
    cdef uint64_t now
    for i in range(PUMP_BATCH):
        b.iovs[i].iov_base = b.data + <Py_ssize_t>i * PUMP_SLOT
        b.iovs[i].iov_len = PUMP_SLOT
    fds[0].fd = udp_fd
    fds[0].events = POLLIN
    fds[1].fd = stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0 and errno != EINTR:
            break
        if fds[1].revents:
            break
        for i in range(PUMP_BATCH):
            b.msgs[i].msg_hdr.msg_name = &b.addrs[i]
            b.msgs[i].msg_hdr.msg_namelen = sizeof(SockAddr)
            b.msgs[i].msg_hdr.msg_iov = &b.iovs[i]
            b.msgs[i].msg_hdr.msg_iovlen = 1
            b.msgs[i].msg_hdr.msg_control = NULL
            b.msgs[i].msg_hdr.msg_controllen = 0
            b.msgs[i].msg_hdr.msg_flags = 0
        got = recvmmsg(udp_fd, b.msgs, PUMP_BATCH, MSG_DONTWAIT, NULL)
        if got <= 0:
            continue
        now = now_ms()
        for i in range(got):
            slot = b.data + <Py_ssize_t>i * PUMP_SLOT
            verdict = dp_datagram(d, c, slot, b.msgs[i].msg_len, &b.addrs[i], now, &peer)
            if verdict == DP_TO_TUN:
                if write(tun_fd, slot + DG_HDR, b.msgs[i].msg_len - DG_HDR) < 0:
                    c.counters[C_TUN_WRITE_ERRORS] += 1
                else:
                    c.counters[C_TUN_TX] += 1
            elif verdict == DP_REJECT:
                _send_reject(d, c, udp_fd, sock_family, now)
        if dp_events_pending(d):
            _wake(event_fd)
