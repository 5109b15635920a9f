# The Python face of the datapath: one Datapath object per node owns the
# tables, the flow tables of its roles, the pump threads and the event fd.
# conn25.fastpath documents this boundary; the control plane uses only it.

from libc.errno cimport errno
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close, read

from includes.atomic cimport c25_store_int
from includes.linux cimport EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from includes.pthread cimport (
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_unlock,
)

import enum
import ipaddress
import os
import socket
import threading
import typing

class EventKind(enum.Enum):
    """What a DatapathEvent reports."""

    FLOW_CREATED = "flow_created"           # a flow of `role` began (keep its assignment alive)
    FLOW_REMOVED = "flow_removed"           # ... ended (reason as in FlowTable events)
    REJECT = "reject"                       # a connector rejected our transit IP: re-register it
    UNMAPPED_TRANSIT = "unmapped_transit"   # we rejected a peer's unmapped transit IP
    HANDSHAKE_WANTED = "handshake_wanted"   # a peer needs a handshake (none, or a rekey is due)
    SESSION_CONFIRMED = "session_confirmed" # a peer's next keypair became current
    UNKNOWN_SESSION = "unknown_session"     # data under no session of ours came from the
                                            # endpoint (transit: its address, peer: its port)


class Role(enum.Enum):
    """The side of the node an event belongs to."""

    CLIENT = "client"
    CONNECTOR = "connector"


DatapathEvent = typing.NamedTuple("DatapathEvent", [
    ("kind", EventKind), ("role", Role), ("transit", bytes), ("peer", int),
    ("reason", typing.Optional[str]), ("flow", typing.Optional[FlowEvent]),
])
DatapathEvent.__new__.__defaults__ = (None, None)
DatapathEvent.__doc__ = """An event for the control plane.

kind: an EventKind; role: a Role (a reject concerns the client side, an
unmapped transit IP the connector side; session events say CLIENT);
transit: the packed transit IP (empty for session events);
peer: the peer id; for flow events, reason as in FlowTable events and flow
the FlowEvent itself (None otherwise).
"""

_COUNTER_NAMES = (  # in the order of the C_* counters (datapath.pxd)
    "tun_rx", "tun_tx", "udp_rx", "udp_tx", "forwarded", "translated", "flows_created",
    "drop_malformed", "drop_unsupported", "drop_no_route", "drop_unknown_index",
    "drop_spoofed", "drop_bad_header", "drop_not_translatable", "unmapped_magic",
    "unmapped_transit", "rejects_sent", "rejects_received", "keepalives_received",
    "tun_write_errors", "udp_send_errors", "flow_insert_failed", "events_dropped",
    "udp_tx_gso", "udp_gso_refused", "udp_rx_gro", "tun_rx_after_write",
    "drop_dst_not_allowed", "drop_src_not_allowed", "drop_return_ambiguous",
    "flows_from_return", "drop_replay", "drop_auth", "drop_expired", "drop_no_endpoint",
    "staged", "handshakes_received", "handshakes_dropped", "crypto_errors",
    "tun_tx_coalesced", "tun_super_packets", "spins", "spin_hits",
    "tun_rx_super_packets", "tun_rx_segments", "drop_offload_header", "drop_offload_packet",
    "drop_offload_unsupported",
)
_PEER_DROPS = ("replay", "auth", "expired", "spoofed", "no_endpoint", "staged_overflow")

_VERDICTS = {DP_DROP: "drop", DP_TO_PEER: "peer", DP_TO_TUN: "tun", DP_REPLY: "reply",
             DP_REJECT: "reject", DP_HANDSHAKE: "handshake"}


cdef object _endpoint_out(const TbEndpoint *ep):
    return (str(ipaddress.ip_address(cv_addr_out(ep.addr, ep.family))), ep.port) \
        if ep.family else None


cdef bytes _key_in(object key, str what):
    key = bytes(key)
    if len(key) != 32:
        raise ValueError(f"{what}: a key is 32 bytes")
    return key


cdef DpCtx *_ctx_new() noexcept:
    """One pump thread's context (NULL: out of memory)."""
    cdef DpCtx *c = <DpCtx *>calloc(1, sizeof(DpCtx))
    if c == NULL:
        return NULL
    c.aead = aead_new()
    if c.aead == NULL:
        free(c)
        return NULL
    nat_frag_init(&c.frags, 30_000)
    return c


cdef void _ctx_free(DpCtx *c) noexcept:
    if c != NULL:
        aead_free(c.aead)
        free(c)


cdef int _endpoint_in(object sender, TbEndpoint *out) except -1:
    """A datagram's sender (ip, port), the ip packed, an ipaddress object or a string."""
    addr, port = sender
    if isinstance(addr, str):
        addr = ipaddress.ip_address(addr)
    memset(out, 0, sizeof(TbEndpoint))
    out.family = cv_addr_in(addr, out.addr, "sender")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"sender port {port!r} is out of range")
    out.port = port
    return 0


cdef class Datapath:
    """Tables, flow tables, pumps and events of one node.

    Datapath(client=True, connector=False, client_flows=10_000,
             connector_flows=100_000, idle_timeout_ms=300_000)

    Times are milliseconds of a monotonic clock (time.monotonic_now_ns() // 10**6,
    which is what the pumps read). The flow table of a role the node does
    not have is None, and no packet is translated for that role.
    """

    cdef DpCore core
    cdef DpCtx *ctx_tun       # queue 0's (process_*, bench_loop)
    cdef DpCtx *ctx_udp
    # Per queue; allocated up to the most queues ever started and kept until the
    # Datapath goes (counters() sums them all).
    cdef DpCtx *qctx_tun[<int>PUMP_MAX_QUEUES]
    cdef DpCtx *qctx_udp[<int>PUMP_MAX_QUEUES]
    cdef int nctx
    cdef int nq               # queues of the last start() (1 before any)
    cdef AeadCtx *aead_ctl    # the control plane's (seal()), used with the GIL held
    cdef uint64_t ctl_counters[<int>C_NCOUNTERS]  # what seal() counted (GIL held)
    cdef PumpBufs *qbufs_tun[<int>PUMP_MAX_QUEUES]
    cdef PumpBufs *qbufs_udp[<int>PUMP_MAX_QUEUES]
    cdef PumpSet pset
    cdef readonly Tables tables
    cdef readonly FlowTable client_flows
    cdef readonly FlowTable connector_flows
    cdef int efd
    cdef int stop_fd
    cdef object threads

    def __cinit__(self, *, client: bool = True, connector: bool = False,
                  client_flows: int = 10_000, connector_flows: int = 100_000,
                  idle_timeout_ms: int = 300_000) -> None:
        self.efd = -1
        self.stop_fd = -1
        self.threads = []
        self.tables = Tables()
        self.client_flows = FlowTable(client_flows, idle_timeout_ms) if client else None
        self.connector_flows = FlowTable(connector_flows, idle_timeout_ms) if connector else None
        memset(&self.core, 0, sizeof(DpCore))
        memset(self.ctl_counters, 0, sizeof(self.ctl_counters))
        memset(&self.pset, 0, sizeof(PumpSet))
        memset(self.qctx_tun, 0, sizeof(self.qctx_tun))
        memset(self.qctx_udp, 0, sizeof(self.qctx_udp))
        memset(self.qbufs_tun, 0, sizeof(self.qbufs_tun))
        memset(self.qbufs_udp, 0, sizeof(self.qbufs_udp))
        self.nctx = 0
        self.nq = 1
        pthread_mutex_init(&self.core.ev_lock, NULL)
        self.core.tables = self.tables.tables
        self.core.client_flows = self.client_flows.table if client else NULL
        self.core.connector_flows = self.connector_flows.table if connector else NULL
        self.core.events = <DpEvent *>calloc(DP_EV_CAP, sizeof(DpEvent))
        self.core.hs = <HsMsg *>calloc(DP_HS_CAP, sizeof(HsMsg))
        if self.core.events == NULL or self.core.hs == NULL:
            raise MemoryError("Datapath: cannot allocate")
        self.aead_ctl = aead_new()
        if self.aead_ctl == NULL:
            raise MemoryError("Datapath: cannot allocate cipher contexts")
        self._contexts(1)
        self.ctx_tun = self.qctx_tun[0]
        self.ctx_udp = self.qctx_udp[0]
        self.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.efd < 0:
            raise OSError(errno, "eventfd: " + os.strerror(errno))

    def __dealloc__(self) -> None:
        # stop() has joined the threads; a Datapath dropped while running
        # would leave them on freed memory, so running ones are stopped first.
        if self.threads:
            self.stop()
        free(self.core.events)
        free(self.core.hs)
        for i in range(PUMP_MAX_QUEUES):
            _ctx_free(self.qctx_tun[i])
            _ctx_free(self.qctx_udp[i])
        aead_free(self.aead_ctl)
        if self.efd >= 0:
            close(self.efd)
        pthread_mutex_destroy(&self.core.ev_lock)

    cdef int _contexts(self, int n) except -1:
        """Contexts for queues 0..n-1 (those of earlier starts are kept)."""
        while self.nctx < n:
            self.qctx_tun[self.nctx] = _ctx_new()
            self.qctx_udp[self.nctx] = _ctx_new()
            if self.qctx_tun[self.nctx] == NULL or self.qctx_udp[self.nctx] == NULL:
                raise MemoryError("Datapath: cannot allocate the pumps' contexts")
            self.nctx += 1
        return 0

    @property
    def event_fd(self) -> int:
        """Readable when events are waiting (wait on it, then read_events())."""
        return self.efd

    @property
    def running(self) -> bool:
        return bool(self.threads)

    # -- the per-packet logic, without devices (tests, benchmarks) -------------

    def process_from_tun(self, packet: bytes, now_ms: int) -> tuple:
        """Decide a packet as if read from the TUN device (with the TUN pump's context).

        Returns (verdict, packet, peer): verdict "peer" (packet rewritten, for
        peer id), "tun" / "reply" (packet to write to the TUN device: for
        "reply" the generated ICMP error), "reject" or "drop".
        """
        self._check_stopped()
        cdef bytearray buf = bytearray(packet)
        cdef uint8_t[::1] mv
        cdef int v
        cdef uint64_t now = cv_ms_in(now_ms, "now_ms")
        if len(buf) == 0:
            self.ctx_tun.counters[C_DROP_MALFORMED] += 1
            return ("drop", b"", None)
        mv = buf
        with nogil:
            v = dp_from_tun(&self.core, self.ctx_tun, &mv[0], mv.shape[0], now)
        if v == DP_REPLY:
            return ("reply", bytes(self.ctx_tun.reply[:self.ctx_tun.reply_len]), None)
        return (_VERDICTS[v], bytes(buf), self.ctx_tun.peer if v == DP_TO_PEER else None)

    def process_datagram(self, datagram: bytes, sender: tuple, now_ms: int) -> tuple:
        """Decide a datagram as if received from underlay address `sender` (ip, port).

        Returns (verdict, inner packet, peer) as process_from_tun; a "reject"
        verdict means the pump would send a reject for the packet's
        destination (a transit IP) to that peer, at most once per
        transit per 0.5 s, and report it as an "unmapped_transit" event.
        """
        self._check_stopped()
        cdef TbEndpoint ep
        cdef bytearray buf = bytearray(datagram)
        cdef uint8_t[::1] mv
        cdef uint32_t peer = 0
        cdef int v
        cdef uint64_t now = cv_ms_in(now_ms, "now_ms")
        cdef Py_ssize_t n = len(buf)
        _endpoint_in(sender, &ep)
        if n == 0:
            buf = bytearray(1)  # an empty datagram is a bad header, counted as such
        mv = buf
        with nogil:
            v = dp_datagram(&self.core, self.ctx_udp, &mv[0], n, &ep, now, &peer, NULL)
            if v == DP_REJECT:
                dp_reject_due(&self.core, self.ctx_udp, now)
        inner = bytes(buf[WG_HDR:WG_HDR + self.ctx_udp.inner_len]) \
            if v in (DP_TO_TUN, DP_REJECT) else b""
        return (_VERDICTS[v], inner, peer if v == DP_REJECT else None)

    # -- WireGuard sessions ----------------------------------------------------

    def install_keypair(self, peer: int, *, local_index: int, remote_index: int,
                        send_key: bytes, receive_key: bytes, initiator: bool,
                        created_ms: int, as_next: bool) -> None:
        """Install a keypair a handshake with `peer` produced: as its current
        one (we initiated: usable at once) or as its next one (we responded:
        confirmed by the first datagram under it). KeyError if no such peer."""
        cdef SsKeypair kp
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef bytes sk = _key_in(send_key, "send_key")
        cdef bytes rk = _key_in(receive_key, "receive_key")
        cdef int r
        memset(&kp, 0, sizeof(SsKeypair))
        memcpy(kp.send_key, <const uint8_t *>sk, 32)
        memcpy(kp.recv_key, <const uint8_t *>rk, 32)
        kp.local_index = cv_u32_in(local_index, "local_index")
        kp.remote_index = cv_u32_in(remote_index, "remote_index")
        kp.created_ms = cv_ms_in(created_ms, "created_ms")
        kp.initiator = 1 if initiator else 0
        rw_init(&kp.window)
        with nogil:
            r = ss_install(self.core.tables, p, &kp, as_next)
            memset(&kp, 0, sizeof(SsKeypair))
        if r == -2:
            raise KeyError(f"install_keypair: no peer {peer}")
        if r < 0:
            raise MemoryError("install_keypair")

    def seal(self, peer: int, packet: bytes, now_ms: int) -> tuple | None:
        """`packet` (b"": a keepalive) sealed for `peer` under its current
        keypair: (datagram, (ip, port) to send it to); or None when it cannot
        go now (counted): without a session a packet is staged until a
        handshake completes, and the handshake is asked for with an event;
        to a peer whose endpoint is not known yet it is dropped."""
        cdef bytes src = bytes(packet)
        cdef Py_ssize_t n = len(src)
        cdef uint64_t now = cv_ms_in(now_ms, "now_ms")
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef bytearray buf = bytearray(WG_HDR + wire_padded(n) + AEAD_TAG)
        cdef uint8_t *b = buf
        cdef TbEndpoint ep
        cdef Py_ssize_t out
        cdef DpCtx ctx
        cdef int i
        memcpy(b + WG_HDR, <const uint8_t *>src, n)
        memset(&ctx, 0, sizeof(DpCtx))
        ctx.aead = self.aead_ctl
        ctx.peer = p
        # With the GIL held: aead_ctl is one cipher context for every caller, and two
        # threads in it at once corrupt each other's datagrams (or crash OpenSSL).
        # The tables' lock taken inside is never held by a thread that waits for the GIL.
        out = dp_seal(&self.core, &ctx, b, n, now, &ep)
        # The context is this call's own (the pumps' have no lock); what it counted
        # (staged, no endpoint, crypto errors) joins counters() here, with the GIL.
        for i in range(C_NCOUNTERS):
            self.ctl_counters[i] += ctx.counters[i]
        if out == 0:
            return None
        return (bytes(buf[:out]), _endpoint_out(&ep))

    def set_endpoint(self, peer: int, endpoint: tuple, now_ms: int) -> bool:
        """`peer` was heard from `endpoint` (ip, port) in an authenticated
        handshake message: its datagrams go there from now on. False if
        there is no such peer."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef TbEndpoint ep
        cdef uint64_t now = cv_ms_in(now_ms, "now_ms")
        cdef TbPeer *rec
        _endpoint_in(endpoint, &ep)
        with nogil:
            pthread_mutex_lock(&self.core.tables.lock)
            rec = tb_peer_locked(self.core.tables, p)
            if rec != NULL:
                ss_learn_endpoint(&rec.wg, &ep, now)
            pthread_mutex_unlock(&self.core.tables.lock)
        return rec != NULL

    def clear_sessions(self, peer: int) -> bool:
        """Forget every keypair of `peer` at once (its key changed: nothing sealed under
        the old one may be accepted any more); False if there is no such peer."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef TbPeer *rec
        with nogil:
            pthread_mutex_lock(&self.core.tables.lock)
            rec = tb_peer_locked(self.core.tables, p)
            if rec != NULL:
                ss_unindex(self.core.tables, &rec.wg)
            pthread_mutex_unlock(&self.core.tables.lock)
        return rec != NULL

    def take_staged(self, peer: int) -> list:
        """The packets staged for `peer`, oldest first (they leave the stage)."""
        cdef SsStaged st
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef uint32_t i
        with nogil:
            ss_take_staged(self.core.tables, p, &st)
        try:
            return [bytes(st.pkts[(st.start + i) % SS_STAGED][:st.lens[(st.start + i) % SS_STAGED]])
                    for i in range(st.count)]
        finally:
            ss_free_staged(&st)

    def read_handshakes(self) -> tuple:
        """([(message, (ip, port)), ...], how many were waiting): the handshake
        messages the pumps queued, oldest first. The count tells the control
        plane whether it is under load."""
        cdef HsMsg *msgs = <HsMsg *>calloc(DP_HS_CAP, sizeof(HsMsg))
        cdef uint32_t n, i
        if msgs == NULL:
            raise MemoryError
        try:
            with nogil:
                pthread_mutex_lock(&self.core.ev_lock)
                n = self.core.hs_len
                for i in range(n):
                    msgs[i] = self.core.hs[(self.core.hs_start + i) % DP_HS_CAP]
                self.core.hs_start = (self.core.hs_start + n) % DP_HS_CAP
                self.core.hs_len = 0
                pthread_mutex_unlock(&self.core.ev_lock)
            return ([(bytes(msgs[i].data[:msgs[i].len]), _endpoint_out(&msgs[i].sender))
                     for i in range(n)], n)
        finally:
            free(msgs)

    def peer_state(self, peer: int) -> dict | None:
        """What the datapath knows of `peer`'s WireGuard side (None: no such
        peer): endpoint (ip, port) or None, endpoint_learned_ms (0:
        configured), bytes and activity stamps (ms, 0: never), drops by
        reason, the sessions' local indices, staged packets. No key material."""
        cdef uint32_t p = cv_u32_in(peer, "peer")
        cdef SsPeer s
        cdef TbPeer *rec
        cdef bint found = False
        cdef int i
        with nogil:
            pthread_mutex_lock(&self.core.tables.lock)
            rec = tb_peer_locked(self.core.tables, p)
            if rec != NULL:
                found = True
                memcpy(&s, &rec.wg, sizeof(SsPeer))
            pthread_mutex_unlock(&self.core.tables.lock)
        if not found:
            return None
        sessions = {}
        for i, name in enumerate(("current", "previous", "next")):
            if s.kp[i].used:
                sessions[name] = {"local_index": s.kp[i].local_index,
                                  "created_ms": s.kp[i].created_ms,
                                  "initiator": bool(s.kp[i].initiator),
                                  "sent": s.kp[i].send_counter}
        out = {
            "endpoint": _endpoint_out(&s.ep),
            "endpoint_learned_ms": s.ep_learned_ms,
            "rx_bytes": s.rx_bytes, "tx_bytes": s.tx_bytes,
            "last_rx_ms": s.last_rx_ms, "last_tx_ms": s.last_tx_ms,
            "tx_unanswered_ms": s.tx_unanswered_ms, "rx_unanswered_ms": s.rx_unanswered_ms,
            "drops": {name: s.drops[i] for i, name in enumerate(_PEER_DROPS)},
            "sessions": sessions,
            "staged": s.staged.count,
        }
        memset(&s, 0, sizeof(SsPeer))
        return out

    # -- events, counters, maintenance ----------------------------------------

    def read_events(self) -> list:
        """Drain every waiting event (and reset the event fd), oldest first per source."""
        cdef uint64_t v
        cdef DpEvent *evs
        cdef uint32_t n, i
        with nogil:
            read(self.efd, &v, 8)
        out = []
        for role, table in ((Role.CLIENT, self.client_flows),
                            (Role.CONNECTOR, self.connector_flows)):
            if table is None:
                continue
            for fe in table.drain_events():
                out.append(DatapathEvent(
                    EventKind.FLOW_CREATED if fe.kind == "created" else EventKind.FLOW_REMOVED,
                    role, fe.transit, fe.peer, fe.reason, fe))
        evs = <DpEvent *>calloc(DP_EV_CAP, sizeof(DpEvent))
        if evs == NULL:
            raise MemoryError
        try:
            with nogil:
                pthread_mutex_lock(&self.core.ev_lock)
                n = self.core.ev_len
                for i in range(n):
                    evs[i] = self.core.events[(self.core.ev_start + i) % DP_EV_CAP]
                self.core.ev_start = (self.core.ev_start + n) % DP_EV_CAP
                self.core.ev_len = 0
                pthread_mutex_unlock(&self.core.ev_lock)
            for i in range(n):
                if evs[i].kind == DP_EV_HANDSHAKE:
                    self._handshake_taken(evs[i].peer)
                    out.append(DatapathEvent(EventKind.HANDSHAKE_WANTED, Role.CLIENT, b"",
                                             evs[i].peer))
                elif evs[i].kind == DP_EV_UNKNOWN_INDEX:
                    out.append(DatapathEvent(EventKind.UNKNOWN_SESSION, Role.CLIENT,
                                             cv_addr_out(evs[i].transit, evs[i].family),
                                             evs[i].peer))
                elif evs[i].kind == DP_EV_CONFIRMED:
                    out.append(DatapathEvent(EventKind.SESSION_CONFIRMED, Role.CLIENT, b"",
                                             evs[i].peer))
                else:
                    reject = evs[i].kind == DP_EV_REJECT
                    out.append(DatapathEvent(
                        EventKind.REJECT if reject else EventKind.UNMAPPED_TRANSIT,
                        Role.CLIENT if reject else Role.CONNECTOR,
                        cv_addr_out(evs[i].transit, evs[i].family), evs[i].peer))
        finally:
            free(evs)
        return out

    cdef void _handshake_taken(self, uint32_t peer) noexcept:
        # The next packet that finds no session raises a new event.
        cdef TbPeer *rec
        with nogil:
            pthread_mutex_lock(&self.core.tables.lock)
            rec = tb_peer_locked(self.core.tables, peer)
            if rec != NULL:
                rec.wg.want_handshake = 0
            pthread_mutex_unlock(&self.core.tables.lock)

    def counters(self) -> dict:
        """Per-reason packet counters of both pumps, summed (racy reads of
        monotonic counters: good for monitoring, not for exact accounting)."""
        cdef int k
        d = {}
        for i in range(C_NCOUNTERS):
            d[_COUNTER_NAMES[i]] = self.ctl_counters[i]
            for k in range(self.nctx):
                d[_COUNTER_NAMES[i]] += self.qctx_tun[k].counters[i] + self.qctx_udp[k].counters[i]
        d["events_dropped"] += self.core.ev_dropped
        for role, table in (("client", self.client_flows), ("connector", self.connector_flows)):
            if table is not None:
                st = table.stats()
                d[role + "_flows"] = st["flows"]
                d["events_dropped"] += st["events_dropped"]
        return d

    def queue_counters(self) -> list:
        """Per queue of the last start() (one before any), what its pumps moved:
        tun_rx (packets read from its TUN queue, super-packets counted once),
        udp_tx (datagrams sent by its TUN -> UDP side), udp_rx (datagrams received
        on its socket) and tun_tx (packets its UDP -> TUN side wrote, into
        whichever queue their flow goes to). Racy reads, as counters()."""
        cdef int k
        out = []
        for k in range(self.nq):
            t, u = self.qctx_tun[k], self.qctx_udp[k]
            out.append({"tun_rx": t.counters[C_TUN_RX], "udp_tx": t.counters[C_UDP_TX],
                        "udp_rx": u.counters[C_UDP_RX], "tun_tx": u.counters[C_TUN_TX]})
        return out

    @property
    def queues(self) -> int:
        """How many queues (pump pairs) the last start() ran (1 before any)."""
        return self.nq

    def save_flows(self) -> bytes:
        """The connector flows that a return packet could not re-create after a
        restart (several transit IPs of one client map to their real address),
        for restore_flows; empty without such flows."""
        if self.connector_flows is None:
            return b""
        return fs_save(&self.core, self.connector_flows.capacity)

    def restore_flows(self, data: bytes, now_ms: int) -> int:
        """Install the flows of a save_flows() blob whose mappings still stand
        (install the mappings first); how many. ValueError if it is not one."""
        return fs_restore(&self.core, data, cv_ms_in(now_ms, "now_ms"))

    def sweep(self, now_ms: int, limit: int = 1000) -> int:
        """Expire idle flows of both tables, at most `limit` each; returns how many."""
        n = 0
        for table in (self.client_flows, self.connector_flows):
            if table is not None:
                n += table.sweep(now_ms, limit)
        return n

    # -- pumps ----------------------------------------------------------------

    def start(self, tun_fds: int | typing.Sequence[int],
              udp_socks: socket.socket | typing.Sequence[socket.socket], *,
              sockbuf: int = 4 << 20, vnet_hdr: bool = False, _tun_thread: bool = True,
              _udp_thread: bool = True) -> None:
        """Start the pump threads on TUN fds (IFF_TUN|IFF_NO_PI) and bound UDP sockets:
        one pair of threads per queue, queue k on tun_fds[k] and udp_socks[k] (an int
        and a socket: one queue).

        Several queues are the queues of one multi-queue TUN (IFF_MULTI_QUEUE) and
        as many sockets bound to one address with SO_REUSEPORT, of one family
        (pump.pxd, "Queues", says how the work spreads). All are made non-blocking,
        and each socket's buffers are raised to
        `sockbuf` bytes (beyond net.core.[rw]mem_max when running as root):
        bursts of a fast TCP stream overflow the default ones, and every
        datagram dropped there is a retransmission. UDP_GRO is turned on
        on the sockets (where the kernel has it), so the pumps must be their
        only reader. The caller keeps ownership of all (and closes them
        after stop()). `vnet_hdr`: the TUN was opened with IFF_VNET_HDR: packets
        read carry a virtio-net header, and consecutive TCP segments of a flow
        are written as one GSO super-packet (coalesce.pxd). With TUN offloads
        on as well (TUNSETOFFLOAD, conn25.daemon.tun.set_offload), what is read
        may be a TSO/USO super-packet, which is translated once and split, or a
        packet with a partial checksum, which is completed (segment.pxd).
        `_tun_thread=False` is for tests: only the UDP -> TUN
        threads run, which read the TUN only right after their own writes;
        `_udp_thread=False` too: only the TUN -> UDP threads run, which read the
        overlay sockets only while they wait for the answer to an isolated packet.
        """
        cdef int k, n
        cdef PumpQueue *q
        if self.threads:
            raise RuntimeError("Datapath is already running")
        fds = [tun_fds] if isinstance(tun_fds, int) else list(tun_fds)
        socks = [udp_socks] if isinstance(udp_socks, socket.socket) else list(udp_socks)
        n = len(fds)
        if not 1 <= n <= PUMP_MAX_QUEUES:
            raise ValueError(f"{n} TUN queues: from 1 to {PUMP_MAX_QUEUES}")
        if len(socks) != n:
            raise ValueError(f"{len(socks)} overlay sockets for {n} TUN queues: one per queue")
        for sock in socks:
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                    sock.type != socket.SOCK_DGRAM:
                raise ValueError("the overlay socket must be a UDP socket (AF_INET or AF_INET6)")
        if n > 1 and len({(sk.family, sk.getsockname()) for sk in socks}) != 1:
            raise ValueError("the overlay sockets of several queues must share one family, "
                             "address and port (SO_REUSEPORT)")
        self._contexts(n)
        for fd in fds:
            os.set_blocking(fd, False)
        for sock in socks:
            sock.setblocking(False)
            if sockbuf:
                for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, force, sockbuf)  # SO_*BUFFORCE
                    except PermissionError:
                        sock.setsockopt(socket.SOL_SOCKET, plain, sockbuf)
        memset(&self.pset, 0, sizeof(PumpSet))
        self.pset.d = &self.core
        self.pset.n = n
        self.pset.sock_family = socks[0].family
        self.pset.event_fd = self.efd
        self.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.stop_fd < 0:
            raise OSError(errno, "eventfd: " + os.strerror(errno))
        self.pset.stop_fd = self.stop_fd
        for k in range(n):
            q = &self.pset.q[k]
            q.tun_fd = fds[k]
            q.udp_fd = socks[k].fileno()
            q.tc = self.qctx_tun[k]
            q.uc = self.qctx_udp[k]
            self._new_bufs(k, vnet_hdr)
        self.nq = n
        for k in range(n):
            pump_enable_gro(self.pset.q[k].udp_fd)  # an old kernel: datagrams one by one
        threads = []
        for k in range(n):
            tail = f"-{k}" if k else ""
            if _tun_thread:
                threads.append(threading.Thread(target=self._run, args=(0, k), daemon=True,
                                                name="conn25-tun-to-udp" + tail))
            if _udp_thread:
                threads.append(threading.Thread(target=self._run, args=(1, k), daemon=True,
                                                name="conn25-udp-to-tun" + tail))
        self.threads = threads
        for t in self.threads:
            t.start()

    cdef int _new_bufs(self, int k, bint vnet_hdr) except -1:
        """Queue k's buffers, locks and epoll sets (freed by _free_pumps on failure)."""
        cdef PumpQueue *q = &self.pset.q[k]
        cdef PumpBufs *tb = <PumpBufs *>calloc(1, sizeof(PumpBufs))
        cdef PumpBufs *ub = <PumpBufs *>calloc(1, sizeof(PumpBufs))
        cdef int i
        self.qbufs_tun[k] = q.tb = tb
        self.qbufs_udp[k] = q.ub = ub
        if tb != NULL:
            tb.epfd = -1
            tb.data = <uint8_t *>calloc(PUMP_BATCH, PUMP_SLOT)
        if ub != NULL:
            ub.epfd = -1
            ub.data = <uint8_t *>calloc(PUMP_BATCH, PUMP_SLOT)
        if tb == NULL or ub == NULL or tb.data == NULL or ub.data == NULL:
            self._free_pumps()
            raise MemoryError("Datapath: cannot allocate pump buffers")
        tb.gso_max = PUMP_SLOT
        for i in range(PUMP_BATCH):  # before any thread may read the socket
            ub.iovs[i].iov_base = ub.data + <Py_ssize_t>i * PUMP_SLOT
            ub.iovs[i].iov_len = PUMP_SLOT
        tb.vnet = ub.vnet = 1 if vnet_hdr else 0
        ub.co_fd = q.tun_fd
        if vnet_hdr:
            tb.segs = <uint8_t *>calloc(1, PUMP_SEG_AREA)
        if vnet_hdr and (co_init(&ub.co) < 0 or tb.segs == NULL):
            self._free_pumps()
            raise MemoryError("Datapath: cannot allocate the coalescing and segment buffers")
        if pump_udp_init(ub, q.udp_fd, self.stop_fd) < 0 \
                or pump_tun_init(tb, q.tun_fd, self.stop_fd) < 0:
            err = errno
            self._free_pumps()
            raise OSError(err, "epoll: " + os.strerror(err))
        return 0

    def _run(self, int which, int k) -> None:
        with nogil:
            if which == 0:
                pump_tun_to_udp(&self.pset, k)
            else:
                pump_udp_to_tun(&self.pset, k)

    def stop(self) -> None:
        """Stop and join every pump (idempotent)."""
        cdef int k
        if not self.threads:
            return
        for k in range(self.pset.n):
            c25_store_int(&self.qbufs_tun[k].stop, 1)
            c25_store_int(&self.qbufs_udp[k].stop, 1)
        pump_wake(self.stop_fd)
        for t in self.threads:
            t.join()
        self.threads = []
        self._free_pumps()

    cdef void _free_pumps(self) noexcept:
        cdef int k
        for k in range(PUMP_MAX_QUEUES):
            if self.qbufs_tun[k] != NULL:
                pump_tun_free(self.qbufs_tun[k])
                free(self.qbufs_tun[k].segs)
                free(self.qbufs_tun[k].data)
                free(self.qbufs_tun[k])
                self.qbufs_tun[k] = NULL
            if self.qbufs_udp[k] != NULL:
                pump_udp_free(self.qbufs_udp[k])
                co_free(&self.qbufs_udp[k].co)
                free(self.qbufs_udp[k].data)
                free(self.qbufs_udp[k])
                self.qbufs_udp[k] = NULL
        self.pset.n = 0
        if self.stop_fd >= 0:
            close(self.stop_fd)
            self.stop_fd = -1

    def _check_stopped(self) -> None:
        # process_* use the pumps' per-thread contexts, which have no lock.
        if self.threads:
            raise RuntimeError("process_* are for a stopped Datapath (the pumps own the contexts)")


# -- micro-benchmark loops (bench/fastpath.py): the per-packet code on one core,
# GIL released, no Python objects inside the loop. Each returns nanoseconds.

def bench_loop(Datapath dp, packet: bytes, iterations: int, what: str,
               peer: int | None = None) -> int:
    """Time `iterations` rounds of copying `packet` into a buffer and then:
    "copy" nothing more (the baseline), "parse" parsing it, "tun" the whole
    TUN-side decision (dp_from_tun), "seal" sealing it for `peer` (dp_seal:
    counter, padding, ChaCha20-Poly1305), "overlay" sealing it for `peer` and
    receiving the datagram (dp_datagram: index, replay window, decryption,
    source check, decision). "seal" needs a current keypair for `peer`;
    "overlay" one whose local and remote index, send and receive key are the
    same, so that the node receives what it sealed."""
    cdef bytes src = bytes(packet)
    cdef Py_ssize_t n = len(src)
    cdef const uint8_t *s = src
    cdef uint8_t *buf = <uint8_t *>calloc(1, n + WG_HDR + WG_PAD + AEAD_TAG)
    cdef uint64_t i, t0, t1, iters = iterations
    cdef uint64_t now = _now_ns() // 1000000
    cdef int mode = {"copy": 0, "parse": 1, "tun": 2, "seal": 3, "overlay": 4}[what]
    cdef Parsed pk
    cdef TbEndpoint ep
    cdef uint32_t from_peer
    cdef Py_ssize_t dlen
    if buf == NULL:
        raise MemoryError
    if mode >= 3:
        if peer is None:
            raise ValueError(f"bench_loop {what!r} needs a peer")
        dp.ctx_tun.peer = cv_u32_in(peer, "peer")
    try:
        with nogil:
            t0 = _now_ns()
            for i in range(iters):
                memcpy(buf + WG_HDR, s, n)
                if mode == 1:
                    pk_parse(buf + WG_HDR, n, &pk)
                elif mode == 2:
                    dp_from_tun(&dp.core, dp.ctx_tun, buf + WG_HDR, n, now)
                elif mode >= 3:
                    dlen = dp_seal(&dp.core, dp.ctx_tun, buf, n, now, &ep)
                    if mode == 4 and dlen:
                        dp_datagram(&dp.core, dp.ctx_udp, buf, dlen, &ep, now, &from_peer, NULL)
            t1 = _now_ns()
    finally:
        free(buf)
    return t1 - t0
