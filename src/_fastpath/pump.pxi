# The pumps: two threads that move packets between the TUN device and the
# overlay's UDP socket, with the GIL released for their whole loop.
#
#   TUN -> UDP: read every packet that is ready (up to PUMP_BATCH), decide
#               each with dp_from_tun, send the batch with one sendmmsg.
#               Consecutive datagrams to the same peer of the same length
#               (the last may be shorter) go as one UDP GSO message, so the
#               kernel walks its IP/UDP output path (and, across a veth, the
#               receiver's input path) once per group rather than once per
#               packet (bench/NOTES.md has the profile that showed this cost).
#   UDP -> TUN: recvmmsg up to PUMP_BATCH messages (with UDP_GRO on, one
#               message can hold several datagrams of the same sender, split
#               here at the size the kernel reports), check the sender and
#               the inner source (DESIGN §2), decide with dp_from_overlay,
#               write each packet to the TUN device.
#
# Both poll only after their fd ran dry (EAGAIN, or a short recvmmsg): under
# load they go from batch to batch without sleeping. They wake the control
# plane's event fd when an event was queued since their last wake-up.
#
# The UDP -> TUN thread also reads the TUN, once, right after a batch in
# which it wrote packets to it: a write into the TUN runs the local stack,
# and what that stack answers at once (an echo reply, a SYN-ACK, an ACK, the
# data an ACK let a sender release) is already in the TUN when the write
# returns. Reading it there saves the TUN -> UDP thread's wake-up (a
# cross-core one, ~36 us on a VM whose idle vCPU halts) on the round trip
# (bench/NOTES.md, "Round trip latency"). Whoever reads the TUN holds the
# TUN side's lock (PumpBufs.tun_lock) from its first read to the end of its
# send, and uses the TUN side's context and buffers (fragment tracking,
# counters, send batch, GSO state): the packets of a flow leave in the order
# they were read, and that state stays single-owner. The TUN -> UDP thread
# takes the lock per batch; the UDP -> TUN thread only tries it (trylock)
# and skips the read when the other holds it, so it never waits behind it.
# Nothing is lost when it skips: poll on the TUN is level-triggered.
#
# Each batch slot is a PUMP_SLOT-byte buffer with DG_HDR bytes of headroom,
# so the datagram header is written in front of a TUN packet without a copy,
# and a GSO message is a list of slots (one iovec each), not a copy either.
# Slots are large enough for a 64 KiB packet: TUN offloads (IFF_VNET_HDR with
# TSO/GRO) can later hand the pumps super-packets without a change to the
# Python API — they would add a virtio-net header in the headroom and a
# segmentation step here.
#
# GSO and GRO change nothing on the wire: every datagram is still one
# header plus one packet; a peer whose socket has no UDP_GRO gets them one by
# one from its kernel. A kernel that refuses a GSO message (no checksum
# offload on the route's device, or a segment over the path MTU) has its
# packets sent one by one, and GSO stops for that segment size and up.
#
# The datagram header (DG_HDR bytes): version (1), type (data, reject,
# keepalive), two reserved bytes (zero). A reject's payload is the address
# family (4 or 6) and the transit IP's 4 or 16 bytes.

from libc.errno cimport EINTR, EINVAL, EIO, EMSGSIZE, errno
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
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *m)
    cmsghdr *CMSG_NXTHDR(msghdr *m, cmsghdr *c)
    unsigned char *CMSG_DATA(cmsghdr *c)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t n)
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

cdef extern from "<netinet/udp.h>" nogil:
    enum: SOL_UDP, UDP_SEGMENT, UDP_GRO

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

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_trylock(pthread_mutex_t *m)

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *ev)
    int epoll_wait(int epfd, epoll_event *evs, int maxevents, int timeout)
    enum: EPOLL_CTL_ADD, EPOLL_CTL_MOD, EPOLLIN, EPOLL_CLOEXEC

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
    GSO_MAX_SEGS = 64       # UDP_MAX_SEGMENTS of older kernels
    GSO_MAX_BYTES = 65000   # under the largest UDP payload (65507 on IPv4)
    PUMP_CTRL = 4           # 8-byte words of control buffer per message (one int cmsg)


cdef struct SockAddr:       # big enough for either family
    sockaddr_in6 sa


cdef struct PumpBufs:
    uint8_t *data           # PUMP_BATCH * PUMP_SLOT bytes
    mmsghdr msgs[<int>PUMP_BATCH]
    iovec iovs[<int>PUMP_BATCH]
    SockAddr addrs[<int>PUMP_BATCH]
    uint64_t ctrl[<int>PUMP_BATCH][<int>PUMP_CTRL]  # cmsg space (UDP_SEGMENT / UDP_GRO)
    size_t gso_max          # largest datagram sent with GSO (0: none); lowered on refusal
    int stop                # set by Datapath.stop() (then stop_fd is written)
    pthread_mutex_t tun_lock  # TUN side's only: held by the thread reading the TUN
    int epfd                # TUN side's only: the TUN -> UDP thread waits here (TUN, stop fd)


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


cdef inline void _set_gso(msghdr *h, uint64_t *ctrl, size_t seg) noexcept nogil:
    cdef uint16_t v = <uint16_t>seg
    cdef cmsghdr *cm
    h.msg_control = ctrl
    h.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
    cm = CMSG_FIRSTHDR(h)
    cm.cmsg_level = SOL_UDP
    cm.cmsg_type = UDP_SEGMENT
    cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
    memcpy(CMSG_DATA(cm), &v, sizeof(uint16_t))


cdef void _send_each(DpCtx *c, int udp_fd, const msghdr *h) noexcept nogil:
    """The datagrams of a GSO message the kernel refused, one message each."""
    cdef mmsghdr one[<int>GSO_MAX_SEGS]
    cdef unsigned int n = <unsigned int>h.msg_iovlen, j, done = 0
    cdef int r
    memset(one, 0, n * sizeof(mmsghdr))
    for j in range(n):
        one[j].msg_hdr.msg_name = h.msg_name
        one[j].msg_hdr.msg_namelen = h.msg_namelen
        one[j].msg_hdr.msg_iov = &h.msg_iov[j]
        one[j].msg_hdr.msg_iovlen = 1
    while done < n:
        r = sendmmsg(udp_fd, &one[done], n - done, 0)
        if r < 0:
            if errno == EINTR:
                continue
            c.counters[C_UDP_SEND_ERRORS] += 1
            done += 1
        else:
            c.counters[C_UDP_TX] += r
            done += r


cdef void _flush(DpCtx *c, PumpBufs *b, int udp_fd, unsigned int nmsg) noexcept nogil:
    """Send messages 0..nmsg-1; those of several datagrams with UDP GSO."""
    cdef unsigned int done = 0, m
    cdef int r
    cdef msghdr *h
    for m in range(nmsg):
        h = &b.msgs[m].msg_hdr
        if h.msg_iovlen > 1:
            _set_gso(h, b.ctrl[m], h.msg_iov[0].iov_len)
        else:
            h.msg_control = NULL
            h.msg_controllen = 0
        h.msg_flags = 0
    while done < nmsg:
        r = sendmmsg(udp_fd, &b.msgs[done], nmsg - done, 0)
        if r < 0:
            if errno == EINTR:
                continue
            h = &b.msgs[done].msg_hdr
            if h.msg_iovlen > 1 and (errno == EIO or errno == EINVAL or errno == EMSGSIZE):
                # Refused as GSO (EIO: the route's device cannot checksum for
                # us; EINVAL: a segment over the path MTU): no GSO from this
                # size up, and these datagrams go one by one.
                b.gso_max = 0 if errno == EIO else h.msg_iov[0].iov_len - 1
                c.counters[C_UDP_GSO_REFUSED] += 1
                _send_each(c, udp_fd, h)
            else:
                # The first message failed (e.g. no route to that endpoint): skip it.
                c.counters[C_UDP_SEND_ERRORS] += h.msg_iovlen
            done += 1
        else:
            for m in range(done, done + <unsigned int>r):
                c.counters[C_UDP_TX] += b.msgs[m].msg_hdr.msg_iovlen
                if b.msgs[m].msg_hdr.msg_iovlen > 1:
                    c.counters[C_UDP_TX_GSO] += b.msgs[m].msg_hdr.msg_iovlen
            done += r


cdef inline void _wake_if_new(DpCore *d, int event_fd, uint64_t *woken) noexcept nogil:
    cdef uint64_t seq = dp_event_seq(d)
    if seq != woken[0]:
        woken[0] = seq
        _wake(event_fd)


cdef inline bint _poll_in(pollfd *fds) noexcept nogil:
    """Sleep until fds[0] is readable; False when the stop fd fired (or poll failed)."""
    fds[0].revents = 0
    fds[1].revents = 0
    if poll(fds, 2, -1) < 0 and errno != EINTR:
        return False
    return fds[1].revents == 0


cdef int _tun_batch(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                    int sock_family, bint *dry) noexcept nogil:
    """Read every packet that is ready (up to PUMP_BATCH), decide each, send the
    batch. The caller holds b.tun_lock. Returns how many packets were read;
    *dry tells whether the TUN ran dry (EAGAIN; or an error, which poll reports)."""
    cdef unsigned int nmsg = 0, npkt = 0, nseg = 0
    cdef Py_ssize_t r
    cdef size_t dlen, seg = 0, total = 0
    cdef uint8_t *slot
    cdef int verdict, i, nread = 0
    cdef TbEndpoint ep
    cdef SockAddr sa        # the endpoint of peer sa_peer, looked up once per batch
    cdef socklen_t alen = 0
    cdef uint32_t sa_peer = 0, msg_peer = 0
    cdef bint grow = False  # whether the last message may take the next datagram
    cdef uint64_t now = now_ms()
    cdef msghdr *h
    dry[0] = False
    for i in range(PUMP_BATCH):
        slot = b.data + <Py_ssize_t>i * PUMP_SLOT
        r = read(tun_fd, slot + DG_HDR, PUMP_SLOT - DG_HDR)
        if r <= 0:
            if r < 0 and errno == EINTR:
                continue
            dry[0] = True  # EAGAIN: nothing more is ready (an error: poll says so)
            break
        nread += 1
        c.counters[C_TUN_RX] += 1
        verdict = dp_from_tun(d, c, slot + DG_HDR, r, now)
        if verdict == DP_REPLY:
            if write(tun_fd, c.reply, c.reply_len) < 0:
                c.counters[C_TUN_WRITE_ERRORS] += 1
            else:
                c.counters[C_TUN_TX] += 1
            continue
        if verdict != DP_TO_PEER:
            continue
        if alen == 0 or c.peer != sa_peer:
            sa_peer = c.peer
            alen = 0
            if tb_peer_endpoint(d.tables, c.peer, &ep):
                alen = _sockaddr_out(&sa, sock_family, &ep)
            if alen == 0:
                c.counters[C_DROP_NO_ROUTE] += 1
                continue
        slot[0] = DG_VERSION
        slot[1] = DG_DATA
        slot[2] = 0
        slot[3] = 0
        dlen = <size_t>r + DG_HDR
        b.iovs[npkt].iov_base = slot
        b.iovs[npkt].iov_len = dlen
        if (grow and msg_peer == sa_peer and dlen <= seg and nseg < GSO_MAX_SEGS
                and total + dlen <= GSO_MAX_BYTES):
            b.msgs[nmsg - 1].msg_hdr.msg_iovlen += 1
            nseg += 1
            total += dlen
            grow = dlen == seg  # a shorter datagram ends a GSO message
        else:
            memcpy(&b.addrs[nmsg], &sa, sizeof(SockAddr))
            h = &b.msgs[nmsg].msg_hdr
            h.msg_name = &b.addrs[nmsg]
            h.msg_namelen = alen
            h.msg_iov = &b.iovs[npkt]
            h.msg_iovlen = 1
            nmsg += 1
            msg_peer = sa_peer
            seg = dlen
            nseg = 1
            total = dlen
            grow = dlen <= b.gso_max
        npkt += 1
    if nmsg:
        _flush(c, b, udp_fd, nmsg)
    return nread


cdef int pump_tun_init(PumpBufs *b, int tun_fd, int stop_fd) noexcept nogil:
    """The TUN side's lock and epoll set (TUN fd, stop fd); 0, or -1 (errno set)."""
    cdef epoll_event ev
    pthread_mutex_init(&b.tun_lock, NULL)
    b.epfd = epoll_create1(EPOLL_CLOEXEC)
    if b.epfd < 0:
        return -1
    memset(&ev, 0, sizeof(ev))
    ev.events = EPOLLIN
    ev.data.fd = tun_fd
    if epoll_ctl(b.epfd, EPOLL_CTL_ADD, tun_fd, &ev) < 0:
        return -1
    ev.data.fd = stop_fd
    return epoll_ctl(b.epfd, EPOLL_CTL_ADD, stop_fd, &ev)


cdef void pump_tun_free(PumpBufs *b) noexcept nogil:
    pthread_mutex_destroy(&b.tun_lock)
    if b.epfd > 0:
        close(b.epfd)
    b.epfd = -1


cdef inline void _tun_watch(PumpBufs *b, int tun_fd, uint32_t events) noexcept nogil:
    """Whether the TUN -> UDP thread is woken by packets in the TUN (EPOLLIN) or not (0).
    Re-enabling it while packets wait wakes it (epoll is level-triggered)."""
    cdef epoll_event ev
    memset(&ev, 0, sizeof(ev))
    ev.events = events
    ev.data.fd = tun_fd
    epoll_ctl(b.epfd, EPOLL_CTL_MOD, tun_fd, &ev)


cdef void pump_tun_to_udp(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                          int sock_family, int stop_fd, int event_fd) noexcept nogil:
    cdef epoll_event evs[2]
    cdef bint wait = True
    cdef int n, i
    cdef uint64_t woken = 0
    while not c25_load_int(&b.stop):
        if wait:
            n = epoll_wait(b.epfd, evs, 2, -1)
            if n < 0 and errno != EINTR:
                break
            for i in range(n if n > 0 else 0):
                if evs[i].data.fd == stop_fd:
                    return
            if n <= 0:
                continue
        pthread_mutex_lock(&b.tun_lock)
        _tun_batch(d, c, b, tun_fd, udp_fd, sock_family, &wait)
        pthread_mutex_unlock(&b.tun_lock)
        _wake_if_new(d, event_fd, &woken)


cdef struct InboundMemo:    # the last anti-spoofing verdict of a receive batch
    uint8_t addr[16]
    uint8_t src[16]
    uint16_t port
    uint8_t family
    uint8_t src_family
    int result              # TB_IN_*, or -1: nothing remembered
    uint32_t peer


cdef inline int _check_inbound(TablesC *t, InboundMemo *memo, uint8_t family,
                               const uint8_t *addr, uint16_t port, uint8_t src_family,
                               const uint8_t *src, uint32_t *peer) noexcept nogil:
    """tb_check_inbound, remembered for one receive batch: the datagrams of a
    batch mostly share sender and inner source (all of them do within a GRO
    message), and each is then checked against the tables as they were for
    the first of them, a copy taken under the lock, never a torn entry."""
    if memo == NULL:
        return tb_check_inbound(t, family, addr, port, src_family, src, peer)
    if (memo.result >= 0 and memo.port == port and memo.family == family
            and memo.src_family == src_family and memcmp(memo.addr, addr, 16) == 0
            and memcmp(memo.src, src, 16) == 0):
        peer[0] = memo.peer
        return memo.result
    memo.peer = 0
    memo.result = tb_check_inbound(t, family, addr, port, src_family, src, &memo.peer)
    memcpy(memo.addr, addr, 16)
    memcpy(memo.src, src, 16)
    memo.port = port
    memo.family = family
    memo.src_family = src_family
    peer[0] = memo.peer
    return memo.result


cdef inline int _dg_type(const uint8_t *dg, Py_ssize_t n) noexcept nogil:
    """The type of a datagram whose header (and reject payload) is well formed, else 0."""
    if n < DG_HDR or dg[0] != DG_VERSION:
        return 0
    if dg[1] == DG_DATA or dg[1] == DG_KEEPALIVE:
        return dg[1]
    if dg[1] == DG_REJECT and n > DG_HDR and (dg[DG_HDR] == 4 or dg[DG_HDR] == 6) \
            and n == DG_HDR + 1 + (4 if dg[DG_HDR] == 4 else 16):
        return DG_REJECT
    return 0


cdef int dp_check_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n,
                           const SockAddr *sender, uint64_t now, Parsed *pk,
                           uint32_t *peer, InboundMemo *memo) noexcept nogil:
    """Header and sender checks for one datagram; for data, the inner packet is
    parsed into pk and its source checked (through `memo` when not NULL).
    Returns the datagram type to act on, or 0 to drop (counted). A datagram
    from an unknown sender counts as that whatever else is wrong with it."""
    cdef uint8_t addr[16]
    cdef uint16_t port
    cdef uint8_t fam = _sockaddr_in(sender, addr, &port)
    cdef int t = _dg_type(dg, n)
    cdef int st = PARSE_OK
    cdef int r
    c.counters[C_UDP_RX] += 1
    if fam == 0:
        c.counters[C_DROP_UNKNOWN_PEER] += 1
        return 0
    if t == DG_DATA:
        st = parse(dg + DG_HDR, n - DG_HDR, pk)
        if st == PARSE_OK:
            # The common case: sender and inner source in one table lookup.
            r = _check_inbound(d.tables, memo, fam, addr, port, pk.key.family, pk.key.src, peer)
            if r == TB_IN_OK:
                return DG_DATA
            c.counters[C_DROP_SPOOFED if r == TB_IN_SPOOFED else C_DROP_UNKNOWN_PEER] += 1
            return 0
    if not tb_peer_by_endpoint(d.tables, fam, addr, port, peer):
        c.counters[C_DROP_UNKNOWN_PEER] += 1
        return 0
    if t == 0:
        c.counters[C_DROP_BAD_HEADER] += 1
    elif t == DG_DATA:
        _count_parse(c, st)
    elif t == DG_KEEPALIVE:
        c.counters[C_KEEPALIVES_RECEIVED] += 1
    else:
        c.counters[C_REJECTS_RECEIVED] += 1
    return 0 if t == DG_DATA else t


cdef int dp_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const SockAddr *sender,
                     uint64_t now, uint32_t *peer, InboundMemo *memo) noexcept nogil:
    """One datagram from the overlay: the verdict for its inner packet
    (DP_TO_TUN, DP_REJECT or DP_DROP); rejects received become events."""
    cdef Parsed pk
    cdef uint8_t transit[16]
    cdef int t = dp_check_datagram(d, c, dg, n, sender, now, &pk, peer, memo)
    if t == DG_DATA:
        return dp_from_overlay(d, c, dg + DG_HDR, n - DG_HDR, peer[0], &pk, now)
    if t == DG_REJECT:
        memset(transit, 0, 16)
        memcpy(transit, dg + DG_HDR + 1, n - DG_HDR - 1)
        dp_push_event(d, DP_EV_REJECT, dg[DG_HDR], peer[0], transit)
    return DP_DROP


cdef inline int _gro_size(msghdr *h) noexcept nogil:
    """The segment size of a message UDP GRO coalesced from several datagrams, else 0."""
    cdef cmsghdr *cm = CMSG_FIRSTHDR(h)
    cdef int v
    while cm != NULL:
        if cm.cmsg_level == SOL_UDP and cm.cmsg_type == UDP_GRO:
            memcpy(&v, CMSG_DATA(cm), sizeof(int))
            return v
        cm = CMSG_NXTHDR(h, cm)
    return 0


cdef inline void _deliver(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const SockAddr *sender,
                          int tun_fd, int udp_fd, int sock_family, uint64_t now,
                          InboundMemo *memo) noexcept nogil:
    cdef uint32_t peer
    cdef int verdict = dp_datagram(d, c, dg, n, sender, now, &peer, memo)
    if verdict == DP_TO_TUN:
        if write(tun_fd, dg + DG_HDR, n - DG_HDR) < 0:
            c.counters[C_TUN_WRITE_ERRORS] += 1
        else:
            c.counters[C_TUN_TX] += 1
    elif verdict == DP_REJECT:
        _send_reject(d, c, udp_fd, sock_family, now)


cdef int pump_enable_gro(int udp_fd) noexcept nogil:
    """Let the kernel hand the UDP -> TUN pump coalesced datagrams (0, or -1 if unsupported)."""
    cdef int one = 1
    return setsockopt(udp_fd, SOL_UDP, UDP_GRO, &one, sizeof(int))


cdef void pump_udp_to_tun(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                          int sock_family, int stop_fd, int event_fd,
                          DpCtx *tc, PumpBufs *tb) noexcept nogil:
    """The UDP -> TUN thread; tc and tb are the TUN side's context and buffers,
    used under tb.tun_lock to read the TUN right after this thread wrote to it."""
    cdef pollfd fds[2]
    cdef int got, i, seg
    cdef uint64_t tun_tx
    cdef bint dry
    cdef Py_ssize_t n, off
    cdef uint8_t *slot
    cdef bint wait = True
    cdef uint64_t now, woken = 0
    cdef msghdr *h
    cdef InboundMemo memo
    for i in range(PUMP_BATCH):
        b.iovs[i].iov_base = b.data + <Py_ssize_t>i * PUMP_SLOT
        b.iovs[i].iov_len = PUMP_SLOT
    fds[0].fd = udp_fd
    fds[0].events = POLLIN
    fds[1].fd = stop_fd
    fds[1].events = POLLIN
    while not c25_load_int(&b.stop):
        if wait and not _poll_in(fds):
            break
        for i in range(PUMP_BATCH):
            h = &b.msgs[i].msg_hdr
            h.msg_name = &b.addrs[i]
            h.msg_namelen = sizeof(SockAddr)
            h.msg_iov = &b.iovs[i]
            h.msg_iovlen = 1
            h.msg_control = b.ctrl[i]
            h.msg_controllen = sizeof(b.ctrl[i])
            h.msg_flags = 0
        got = recvmmsg(udp_fd, b.msgs, PUMP_BATCH, MSG_DONTWAIT, NULL)
        # A short batch means the socket ran dry: poll before the next one.
        wait = got < PUMP_BATCH
        if got <= 0:
            continue
        now = now_ms()
        memo.result = -1
        tun_tx = c.counters[C_TUN_TX]
        # What our writes bring into the TUN, this thread reads: the TUN -> UDP
        # thread is not woken for it meanwhile (a wake-up that would also take
        # the core the next hop's thread is about to be woken on).
        _tun_watch(tb, tun_fd, 0)
        for i in range(got):
            slot = b.data + <Py_ssize_t>i * PUMP_SLOT
            n = b.msgs[i].msg_len
            seg = _gro_size(&b.msgs[i].msg_hdr)
            if seg <= 0 or seg >= n:
                _deliver(d, c, slot, n, &b.addrs[i], tun_fd, udp_fd, sock_family, now, &memo)
                continue
            c.counters[C_UDP_RX_GRO] += (n + seg - 1) // seg
            off = 0
            while off < n:
                _deliver(d, c, slot + off, min(<Py_ssize_t>seg, n - off), &b.addrs[i],
                         tun_fd, udp_fd, sock_family, now, &memo)
                off += seg
        # What the local stack answered inside those writes is in the TUN now.
        if c.counters[C_TUN_TX] != tun_tx and pthread_mutex_trylock(&tb.tun_lock) == 0:
            tc.counters[C_TUN_RX_AFTER_WRITE] += _tun_batch(d, tc, tb, tun_fd, udp_fd,
                                                            sock_family, &dry)
            pthread_mutex_unlock(&tb.tun_lock)
        _tun_watch(tb, tun_fd, EPOLLIN)
        _wake_if_new(d, event_fd, &woken)
