# The pump threads; how they move packets and their types are in pump.pxd.

from libc.errno cimport EINTR, EINVAL, EIO, EMSGSIZE, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read, write

from includes.atomic cimport c25_load_int
from includes.linux cimport (
    sched_yield,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLL_CTL_MOD,
    EPOLLIN,
    POLLIN,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    poll,
    pollfd,
)
from includes.pthread cimport (
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_trylock,
    pthread_mutex_unlock,
)
from includes.socket cimport (
    AF_INET,
    AF_INET6,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    MSG_DONTWAIT,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    cmsghdr,
    htons,
    mmsghdr,
    msghdr,
    ntohs,
    recvmmsg,
    sendmmsg,
    sendto,
    setsockopt,
    sockaddr,
    sockaddr_in,
    socklen_t,
)


cdef inline uint64_t _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>ts.tv_nsec // 1000000


cdef inline socklen_t _sockaddr_out(SockAddr *out, int sock_family,
                                    const TbEndpoint *ep) noexcept nogil:
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
    """Family (4/6, 0 if unknown), address (16-byte form) and port of a datagram's sender."""
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


cdef void _send_reject(DpCore *d, DpCtx *c, int udp_fd, int sock_family,
                       uint64_t now) noexcept nogil:
    cdef uint8_t dg[WG_HDR + WIRE_REJECT_MAX + WG_PAD + AEAD_TAG]
    cdef TbEndpoint ep
    cdef SockAddr sa
    cdef socklen_t alen
    cdef Py_ssize_t n
    if not dp_reject_due(d, c, now):
        return
    n = dp_seal_reject(d, c, dg, now, &ep)
    if n == 0:
        return
    alen = _sockaddr_out(&sa, sock_family, &ep)
    if alen == 0:
        return
    if sendto(udp_fd, dg, n, MSG_DONTWAIT, <const sockaddr *>&sa, alen) < 0:
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
        pump_wake(event_fd)


cdef inline void _run_send(DpCtx *c, PumpBufs *b, TxRun *run, int udp_fd) noexcept nogil:
    """Send what the batch holds so far and start it afresh (its buffers are free again)."""
    if run.nmsg:
        _flush(c, b, udp_fd, run.nmsg)
    memset(run, 0, sizeof(TxRun))


cdef inline void _run_add(DpCtx *c, PumpBufs *b, TxRun *run, uint8_t *dg, size_t dlen,
                          const TbEndpoint *ep, int sock_family, int udp_fd) noexcept nogil:
    """Add a sealed datagram for peer c.peer to the batch: to the last message as
    one more GSO segment when it may, else as a new message."""
    cdef socklen_t alen
    cdef msghdr *h
    cdef bint joins = (run.grow and run.peer == c.peer and dlen <= run.seg
                       and run.nseg < GSO_MAX_SEGS and run.total + dlen <= GSO_MAX_BYTES)
    if run.npkt == PUMP_IOVS or (not joins and run.nmsg == PUMP_BATCH):
        _run_send(c, b, run, udp_fd)
        joins = False
    b.iovs[run.npkt].iov_base = dg
    b.iovs[run.npkt].iov_len = dlen
    if joins:
        b.msgs[run.nmsg - 1].msg_hdr.msg_iovlen += 1
        run.nseg += 1
        run.total += dlen
        run.grow = dlen == run.seg  # a shorter datagram ends a GSO message
    else:
        alen = _sockaddr_out(&b.addrs[run.nmsg], sock_family, ep)
        if alen == 0:
            c.counters[C_DROP_NO_ROUTE] += 1
            return
        h = &b.msgs[run.nmsg].msg_hdr
        h.msg_name = &b.addrs[run.nmsg]
        h.msg_namelen = alen
        h.msg_iov = &b.iovs[run.npkt]
        h.msg_iovlen = 1
        run.nmsg += 1
        run.peer = c.peer
        run.seg = dlen
        run.nseg = 1
        run.total = dlen
        run.grow = dlen <= b.gso_max
    run.npkt += 1


cdef void _split_send(DpCore *d, DpCtx *c, PumpBufs *b, TxRun *run, SgState *sg,
                      int udp_fd, int sock_family, uint64_t now) noexcept nogil:
    """Split a super-packet already decided for peer c.peer (segment.pxd): each
    segment is written into the segment area, sealed there and batched."""
    cdef Py_ssize_t stride = (WG_HDR + wire_padded(sg_max_segment(sg)) + AEAD_TAG + 63) & ~63
    cdef Py_ssize_t m
    cdef size_t dlen
    cdef uint8_t *dg
    cdef TbEndpoint ep
    c.counters[C_TUN_RX_SUPER] += 1
    while True:
        # Room for the segment and its message first: _run_add then never sends
        # (and frees the area) while a segment in it waits to be batched.
        if run.area + stride > PUMP_SEG_AREA or run.npkt == PUMP_IOVS \
                or run.nmsg == PUMP_BATCH:
            _run_send(c, b, run, udp_fd)
        dg = b.segs + run.area
        m = sg_next(sg, dg + WG_HDR)
        if m == 0:
            return
        c.counters[C_TUN_RX_SEGMENTS] += 1
        dlen = <size_t>dp_seal(d, c, dg, m, now, &ep)
        if dlen == 0:
            continue
        run.area += stride
        _run_add(c, b, run, dg, dlen, &ep, sock_family, udp_fd)


cdef inline bint _offload_ok(DpCtx *c, int rc) noexcept nogil:
    """Whether sg_parse let a packet through; counts the drop when not."""
    if rc >= 0:
        return True
    c.counters[C_DROP_OFFLOAD_HEADER if rc == SG_E_HEADER else
               C_DROP_OFFLOAD_PACKET if rc == SG_E_PACKET else C_DROP_OFFLOAD_UNSUPPORTED] += 1
    return False


cdef int _tun_batch(DpCore *d, DpCtx *c, PumpBufs *b, int tun_fd, int udp_fd,
                    int sock_family, bint *dry) noexcept nogil:
    """Read every packet that is ready (up to PUMP_BATCH), decide each, send the
    batch. The caller holds b.tun_lock. Returns how many packets were read;
    *dry tells whether the TUN ran dry (EAGAIN; or an error, which poll reports)."""
    cdef Py_ssize_t r
    cdef size_t dlen
    cdef uint8_t *slot
    cdef int verdict, i, nread = 0, sg_rc = SG_PLAIN
    cdef TbEndpoint ep
    cdef TxRun run
    cdef SgState sg
    cdef uint64_t now = _now_ms()
    cdef int vnet = VNET_HDR if b.vnet else 0
    memset(&run, 0, sizeof(TxRun))
    dry[0] = False
    for i in range(PUMP_BATCH):
        slot = b.data + <Py_ssize_t>i * PUMP_SLOT
        # With a virtio-net header, it lands in the datagram's header room.
        r = read(tun_fd, slot + WG_HDR - vnet, PUMP_SLOT - WG_HDR - WG_PAD - AEAD_TAG + vnet)
        if r <= 0:
            if r < 0 and errno == EINTR:
                continue
            dry[0] = True  # EAGAIN: nothing more is ready (an error: poll says so)
            break
        if vnet:
            r -= vnet
            if r <= 0:
                c.counters[C_DROP_UNSUPPORTED] += 1
                continue
            # A super-packet to split, or a plain packet (its partial checksum completed).
            sg_rc = sg_parse(slot + WG_HDR - vnet, slot + WG_HDR, r, &sg)
            if not _offload_ok(c, sg_rc):
                continue
        nread += 1
        c.counters[C_TUN_RX] += 1
        verdict = dp_from_tun(d, c, slot + WG_HDR, r, now)
        if verdict == DP_REPLY:
            # The slot's packet is done with: the reply goes there, behind the header room.
            memcpy(slot + WG_HDR, c.reply, c.reply_len)
            co_write_plain(tun_fd, c.counters, slot + WG_HDR, c.reply_len, vnet != 0)
            continue
        if verdict != DP_TO_PEER:
            continue
        if sg_rc == SG_SPLIT:
            # Translated once above (lengths and offsets unchanged): now split.
            _split_send(d, c, b, &run, &sg, udp_fd, sock_family, now)
            continue
        # Sealed in place: the header goes into the slot's headroom.
        dlen = <size_t>dp_seal(d, c, slot, r, now, &ep)
        if dlen == 0:
            continue
        _run_add(c, b, &run, slot, dlen, &ep, sock_family, udp_fd)
    _run_send(c, b, &run, udp_fd)
    return nread


cdef int _epoll_init(PumpBufs *b, int fd, int stop_fd) noexcept nogil:
    """The side's epoll set: its fd and the stop fd; 0, or -1 (errno set)."""
    cdef epoll_event ev
    b.epfd = epoll_create1(EPOLL_CLOEXEC)
    if b.epfd < 0:
        return -1
    memset(&ev, 0, sizeof(ev))
    ev.events = EPOLLIN
    ev.data.fd = fd
    if epoll_ctl(b.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
        return -1
    ev.data.fd = stop_fd
    return epoll_ctl(b.epfd, EPOLL_CTL_ADD, stop_fd, &ev)


cdef int pump_tun_init(PumpBufs *b, int tun_fd, int stop_fd) noexcept nogil:
    """The TUN side's lock and epoll set (TUN fd, stop fd); 0, or -1 (errno set)."""
    pthread_mutex_init(&b.tun_lock, NULL)
    return _epoll_init(b, tun_fd, stop_fd)


cdef int pump_udp_init(PumpBufs *b, int udp_fd, int stop_fd) noexcept nogil:
    """The UDP side's lock and epoll set (overlay socket, stop fd); 0, or -1 (errno set)."""
    pthread_mutex_init(&b.udp_lock, NULL)
    return _epoll_init(b, udp_fd, stop_fd)


cdef void pump_tun_free(PumpBufs *b) noexcept nogil:
    pthread_mutex_destroy(&b.tun_lock)
    _epoll_free(b)


cdef void pump_udp_free(PumpBufs *b) noexcept nogil:
    pthread_mutex_destroy(&b.udp_lock)
    _epoll_free(b)


cdef inline void _epoll_free(PumpBufs *b) noexcept nogil:
    if b.epfd > 0:
        close(b.epfd)
    b.epfd = -1


cdef inline void _watch(PumpBufs *b, int fd, uint32_t events) noexcept nogil:
    """Whether the side's thread is woken by what arrives on its fd (EPOLLIN) or not (0),
    while the other thread reads that fd for it. Re-enabling it while something waits
    wakes it (epoll is level-triggered)."""
    cdef epoll_event ev
    memset(&ev, 0, sizeof(ev))
    ev.events = events
    ev.data.fd = fd
    epoll_ctl(b.epfd, EPOLL_CTL_MOD, fd, &ev)


cdef inline int _wait(PumpBufs *b, int stop_fd) noexcept nogil:
    """Sleep until the side's fd is readable: 1; 0 to try again (EINTR); -1 to stop."""
    cdef epoll_event evs[2]
    cdef int i, n = epoll_wait(b.epfd, evs, 2, -1)
    if n < 0:
        return 0 if errno == EINTR else -1
    for i in range(n):
        if evs[i].data.fd == stop_fd:
            return -1
    return 1 if n > 0 else 0


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef void _spin_for_reply(PumpSet *s, int k, uint64_t until) noexcept nogil:
    """Poll the overlay sockets until `until` (ns) for the answer to what queue k
    just sent, and deliver it from this thread (see pump.pxd, "isolated"; every
    queue's socket: the answer lands on the one its peer hashes to)."""
    cdef DpCtx *c = s.q[k].tc
    cdef PumpQueue *q
    cdef int j, got, busy
    c.counters[C_SPINS] += 1
    # The answer is this thread's to deliver: the UDP -> TUN threads are not woken for
    # it (a wake-up that would take the core the next hop's thread is about to need).
    for j in range(s.n):
        _watch(s.q[j].ub, s.q[j].udp_fd, 0)
    while _now_ns() < until and not c25_load_int(&s.q[k].tb.stop):
        got = busy = 0
        for j in range(s.n):
            q = &s.q[j]
            if pthread_mutex_trylock(&q.ub.udp_lock) != 0:
                busy += 1  # that socket's UDP -> TUN thread is at it already
                continue
            if _udp_batch(s, j) > 0:
                got = 1
            pthread_mutex_unlock(&q.ub.udp_lock)
        if got:
            c.counters[C_SPIN_HITS] += 1
            break
        if busy == s.n:
            break
        # Not a bare pause: a thread that became runnable on this core (the
        # peer's, when the other core is busy) runs now instead of after the spin.
        sched_yield()
    for j in range(s.n):
        _watch(s.q[j].ub, s.q[j].udp_fd, EPOLLIN)


cdef void pump_tun_to_udp(PumpSet *s, int k) noexcept nogil:
    """Queue k's TUN -> UDP thread."""
    cdef DpCtx *c = s.q[k].tc
    cdef PumpBufs *b = s.q[k].tb
    cdef bint wait = True
    cdef int ready, read_now
    cdef uint64_t woken = 0, t, last = 0, budget = SPIN_BUDGET_CAP_NS
    while not c25_load_int(&b.stop):
        if wait:
            ready = _wait(b, s.stop_fd)
            if ready < 0:
                return
            if ready == 0:
                continue
        pthread_mutex_lock(&b.tun_lock)
        read_now = _tun_batch(s.d, c, b, s.q[k].tun_fd, s.q[k].udp_fd, s.sock_family, &wait)
        pthread_mutex_unlock(&b.tun_lock)
        _wake_if_new(s.d, s.event_fd, &woken)
        t = _now_ns()
        budget = min(<uint64_t>SPIN_BUDGET_CAP_NS, budget + (t - last) // SPIN_SHARE)
        if (0 < read_now <= SPIN_PACKETS and t - last > <uint64_t>SPIN_QUIET_NS
                and budget >= <uint64_t>SPIN_NS):
            _spin_for_reply(s, k, t + SPIN_NS)
            budget -= min(budget, _now_ns() - t)
        last = t


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


cdef int pump_queue_of(const uint8_t *p, Py_ssize_t n, int nq) noexcept nogil:
    """The TUN queue (0..nq-1) a packet from the overlay is written into: a hash of
    its addresses, protocol and, unless it is a fragment, TCP/UDP ports, so every
    packet of a flow (every fragment of a datagram) goes into the same one."""
    cdef uint32_t h = 0, w
    cdef Py_ssize_t i, l3, alen
    cdef uint8_t proto
    cdef bint ports = False
    if nq <= 1 or n < 20:
        return 0
    if p[0] >> 4 == 4:
        l3 = (p[0] & 0x0F) * 4
        proto = p[9]
        i = 12
        alen = 8
        ports = (p[6] & 0x3F) == 0 and p[7] == 0  # neither MF nor an offset
    elif p[0] >> 4 == 6 and n >= 40:
        l3 = 40
        proto = p[6]  # extension headers: hashed on the addresses alone
        i = 8
        alen = 32
        ports = True
    else:
        return 0
    while alen > 0:
        memcpy(&w, p + i, 4)
        h = (h ^ w) * <uint32_t>0x9E3779B1
        i += 4
        alen -= 4
    if ports and (proto == 6 or proto == 17) and n >= l3 + 4:
        memcpy(&w, p + l3, 4)
        h = (h ^ w) * <uint32_t>0x9E3779B1
    h = (h ^ proto ^ (h >> 16)) * <uint32_t>0x85EBCA6B
    return <int>(((<uint64_t>(h ^ (h >> 13))) * <uint64_t>nq) >> 32)


cdef inline void _deliver(PumpSet *s, DpCtx *c, PumpBufs *b, uint8_t *dg, Py_ssize_t n,
                          const TbEndpoint *sender, int udp_fd, uint64_t now,
                          InboundMemo *memo, uint32_t *written) noexcept nogil:
    """Open and decide one datagram; its packet goes into the TUN queue of its flow
    (pump_queue_of), which joins `written` (that queue's thread is not woken for
    what the write brings: this thread reads it after the batch)."""
    cdef uint32_t peer
    cdef uint8_t *p
    cdef int k, fd
    cdef int verdict = dp_datagram(s.d, c, dg, n, sender, now, &peer, memo)
    if verdict == DP_TO_TUN:
        p = dg + WG_HDR
        k = pump_queue_of(p, c.inner_len, s.n)
        fd = s.q[k].tun_fd
        if not (written[0] >> k) & 1:
            written[0] |= (<uint32_t>1) << k
            _watch(s.q[k].tb, fd, 0)
        if b.vnet:
            if b.co.len and b.co_fd != fd:
                co_flush(&b.co, b.co_fd, c.counters)
            b.co_fd = fd
            co_push(&b.co, fd, c.counters, p, c.inner_len)
        else:
            co_write_plain(fd, c.counters, p, c.inner_len, False)
    elif verdict == DP_REJECT:
        _send_reject(s.d, c, udp_fd, s.sock_family, now)


cdef int pump_enable_gro(int udp_fd) noexcept nogil:
    """Let the kernel hand the UDP -> TUN pump coalesced datagrams (0, or -1 if unsupported)."""
    cdef int one = 1
    return setsockopt(udp_fd, SOL_UDP, UDP_GRO, &one, sizeof(int))


cdef int _udp_batch(PumpSet *s, int j) noexcept nogil:
    """Receive what is ready on queue j's socket (up to PUMP_BATCH messages) and
    deliver it; then read what the local stack answered into the TUN queues written
    to meanwhile. The caller holds queue j's udp_lock. Returns how many messages
    recvmmsg gave (<= 0: none)."""
    cdef DpCtx *c = s.q[j].uc
    cdef PumpBufs *b = s.q[j].ub
    cdef int udp_fd = s.q[j].udp_fd
    cdef PumpQueue *q
    cdef int got, i, k, seg
    cdef uint32_t written = 0
    cdef bint dry
    cdef Py_ssize_t n, off
    cdef uint8_t *slot
    cdef uint64_t now
    cdef msghdr *h
    cdef InboundMemo memo
    cdef TbEndpoint sender
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
    if got <= 0:
        return got
    now = _now_ms()
    memo.result = -1
    # What our writes bring into the TUN, this thread reads: the TUN -> UDP
    # thread of the queue written to is not woken for it meanwhile (a wake-up
    # that would also take the core the next hop's thread is about to be woken on).
    for i in range(got):
        slot = b.data + <Py_ssize_t>i * PUMP_SLOT
        n = b.msgs[i].msg_len
        seg = _gro_size(&b.msgs[i].msg_hdr)
        sender.family = _sockaddr_in(&b.addrs[i], sender.addr, &sender.port)
        if seg <= 0 or seg >= n:
            _deliver(s, c, b, slot, n, &sender, udp_fd, now, &memo, &written)
            continue
        c.counters[C_UDP_RX_GRO] += (n + seg - 1) // seg
        off = 0
        while off < n:
            _deliver(s, c, b, slot + off, min(<Py_ssize_t>seg, n - off), &sender,
                     udp_fd, now, &memo, &written)
            off += seg
    if b.vnet:
        co_flush(&b.co, b.co_fd, c.counters)
    # What the local stack answered inside those writes is in the TUN now, in the
    # queues written to; each is read with its own context, buffers and socket.
    for k in range(s.n):
        if not (written >> k) & 1:
            continue
        q = &s.q[k]
        if pthread_mutex_trylock(&q.tb.tun_lock) == 0:
            q.tc.counters[C_TUN_RX_AFTER_WRITE] += _tun_batch(s.d, q.tc, q.tb, q.tun_fd,
                                                              q.udp_fd, s.sock_family, &dry)
            pthread_mutex_unlock(&q.tb.tun_lock)
        _watch(q.tb, q.tun_fd, EPOLLIN)
    return got


cdef void pump_udp_to_tun(PumpSet *s, int k) noexcept nogil:
    """Queue k's UDP -> TUN thread; it reads the TUN queues it wrote to right after
    its writes, with their TUN side's context and buffers, under their tun_lock."""
    cdef PumpBufs *b = s.q[k].ub
    cdef int got, ready
    cdef bint wait = True
    cdef uint64_t woken = 0
    while not c25_load_int(&b.stop):
        if wait:
            ready = _wait(b, s.stop_fd)
            if ready < 0:
                return
            if ready == 0:
                continue
        pthread_mutex_lock(&b.udp_lock)
        got = _udp_batch(s, k)
        pthread_mutex_unlock(&b.udp_lock)
        # A short batch means the socket ran dry: poll before the next one.
        wait = got < PUMP_BATCH
        _wake_if_new(s.d, s.event_fd, &woken)
