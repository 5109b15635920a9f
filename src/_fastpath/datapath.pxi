# The per-packet decisions of both roles: what happens to one packet that
# came from the TUN device (the local kernel) or from the overlay (a peer).
#
# This is the datapath's sans-IO core: dp_from_tun / dp_from_overlay take a
# packet buffer and return a verdict, rewriting the packet in place; the
# pumps (pump.pxi) do the reading and writing around them, and the tests and
# benchmarks drive them through Datapath.process_* without any device.
#
# Client (DESIGN §4): known flow -> apply; magic IP with an assignment ->
# new flow (DNAT magic->transit out, SNAT transit->magic back); magic IP
# without one -> ICMP unreachable into the TUN; anything else -> plain
# overlay routing. Connector: known flow -> apply; (peer, transit) mapped ->
# new flow (DNAT transit->real, SNAT real->transit back); a transit IP in the
# pools but unmapped for that peer -> drop and reject to the peer.
#
# Neither role is a router: from the overlay, only packets to this node's own
# overlay addresses are delivered untranslated, anything else not translated
# is dropped ("destination not allowed"); toward the overlay, only packets
# from its own overlay addresses go out untranslated, so nothing that the
# kernel routed into the TUN from another interface reaches the tailnet.
#
# A return packet whose flow is gone (the node restarted, its flow table with
# it) re-creates the flow when the mapping names one translation: on a client
# the transit IP of the packet's source names its magic IP; on a connector
# the (client, real address) pair names one transit IP of that client, unless
# two or more of its transit IPs map to that real address (then the packet
# is dropped and the client's next packet re-creates the flow). Only replies
# the kernel un-masqueraded reach the connector's TUN from outside (its
# nftables table drops the rest), so this re-opens no injection path.
#
# Every table is consulted under its own lock and results are copied out, so
# a packet never sees half of an old and half of a new mapping; a flow, once
# created, carries its own rewrite and no longer consults the mapping tables
# (B54), so established flows survive mapping changes.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset


cdef enum:  # verdicts
    DP_DROP = 0         # drop (a counter says why)
    DP_TO_PEER = 1      # send the (rewritten) packet to peer `DpCtx.peer`
    DP_TO_TUN = 2       # write the (rewritten) packet to the TUN device
    DP_REPLY = 3        # drop; write DpCtx.reply (an ICMP error) to the TUN device
    DP_REJECT = 4       # drop; send a reject naming DpCtx.transit to peer DpCtx.peer

cdef enum:  # counters, one array per side, TUN and UDP (summed when read)
    C_TUN_RX = 0
    C_TUN_TX
    C_UDP_RX
    C_UDP_TX
    C_FORWARDED         # plain overlay traffic, untranslated
    C_TRANSLATED        # packets rewritten by a flow
    C_FLOWS_CREATED
    C_DROP_MALFORMED
    C_DROP_UNSUPPORTED
    C_DROP_NO_ROUTE
    C_DROP_UNKNOWN_PEER
    C_DROP_SPOOFED
    C_DROP_BAD_HEADER
    C_DROP_NOT_TRANSLATABLE  # e.g. an ICMP error or a stray fragment towards a magic IP
    C_UNMAPPED_MAGIC
    C_UNMAPPED_TRANSIT
    C_REJECTS_SENT
    C_REJECTS_RECEIVED
    C_KEEPALIVES_RECEIVED
    C_TUN_WRITE_ERRORS
    C_UDP_SEND_ERRORS
    C_FLOW_TABLE_FULL
    C_EVENTS_DROPPED
    C_UDP_TX_GSO            # datagrams sent inside UDP GSO messages (also in udp_tx)
    C_UDP_GSO_REFUSED       # GSO messages the kernel refused (their datagrams went singly)
    C_UDP_RX_GRO            # datagrams received coalesced by UDP GRO (also in udp_rx)
    C_TUN_RX_AFTER_WRITE    # TUN packets the UDP -> TUN thread read after its writes (also in tun_rx)
    C_DROP_DST_NOT_ALLOWED  # from the overlay, untranslated and not to one of our addresses
    C_DROP_SRC_NOT_ALLOWED  # from the TUN, untranslated and not from one of our addresses
    C_DROP_RETURN_AMBIGUOUS # a return packet without flow that maps to several transit IPs
    C_FLOWS_FROM_RETURN     # flows re-created from a return packet (also in flows_created)
    C_NCOUNTERS

_COUNTER_NAMES = (
    "tun_rx", "tun_tx", "udp_rx", "udp_tx", "forwarded", "translated", "flows_created",
    "drop_malformed", "drop_unsupported", "drop_no_route", "drop_unknown_peer",
    "drop_spoofed", "drop_bad_header", "drop_not_translatable", "unmapped_magic",
    "unmapped_transit", "rejects_sent", "rejects_received", "keepalives_received",
    "tun_write_errors", "udp_send_errors", "flow_insert_failed", "events_dropped",
    "udp_tx_gso", "udp_gso_refused", "udp_rx_gro", "tun_rx_after_write",
    "drop_dst_not_allowed", "drop_src_not_allowed", "drop_return_ambiguous",
    "flows_from_return",
)

cdef enum:
    REJECT_MEMO = 64        # recent rejects remembered per thread, to send one per transit per
    REJECT_GAP_MS = 500     # ... REJECT_GAP_MS rather than one per dropped packet
    DP_EV_CAP = 4096        # datapath events waiting for the control plane

cdef enum:  # datapath events (flow events live in the flow tables' rings)
    DP_EV_REJECT = 1        # a peer rejected our transit IP: re-register it
    DP_EV_UNMAPPED = 2      # we rejected a peer's unmapped transit IP


cdef struct RejectMemo:
    uint8_t transit[16]
    uint32_t peer
    uint64_t at
    uint8_t family


cdef struct DpCtx:          # one per side (TUN reader, UDP reader); no locking inside:
                            # the TUN side's is used only under PumpBufs.tun_lock
    uint64_t counters[<int>C_NCOUNTERS]
    FragTable frags
    RejectMemo rejects[<int>REJECT_MEMO]
    uint8_t reply[<int>UNREACH_BUF_SIZE]
    Py_ssize_t reply_len
    uint8_t transit[16]     # DP_REJECT: the transit IP to name
    uint8_t family          # DP_REJECT: its family
    uint32_t peer           # DP_TO_PEER / DP_REJECT


cdef struct DpEvent:
    uint8_t kind
    uint8_t family
    uint32_t peer
    uint8_t transit[16]


cdef struct DpCore:         # what the per-packet code needs, as raw pointers
    TablesC *tables
    FlowTableC *client_flows    # NULL unless the node is a client
    FlowTableC *connector_flows # NULL unless the node is a connector
    pthread_mutex_t ev_lock
    DpEvent *events
    uint32_t ev_start
    uint32_t ev_len
    uint64_t ev_dropped
    uint64_t ev_pushed          # events ever queued (dp_event_seq)


cdef void dp_push_event(DpCore *d, uint8_t kind, uint8_t family, uint32_t peer,
                        const uint8_t *transit) noexcept nogil:
    pthread_mutex_lock(&d.ev_lock)
    cdef DpEvent *e
    if d.ev_len == DP_EV_CAP:
        d.ev_dropped += 1
    else:
        e = &d.events[(d.ev_start + d.ev_len) % DP_EV_CAP]
        e.kind = kind
        e.family = family
        e.peer = peer
        memcpy(e.transit, transit, 16)
        d.ev_len += 1
        d.ev_pushed += 1
    pthread_mutex_unlock(&d.ev_lock)


cdef inline uint64_t dp_event_seq(DpCore *d) noexcept nogil:
    """How many events were ever queued, in all rings: a pump wakes the
    control plane when this moved since its last wake-up, not after every
    batch while events wait. Unlocked reads of counters that only grow: a
    hint, never used for correctness."""
    cdef uint64_t n = c25_load_u64(&d.ev_pushed)
    if d.client_flows != NULL:
        n += c25_load_u64(&d.client_flows.emitted)
    if d.connector_flows != NULL:
        n += c25_load_u64(&d.connector_flows.emitted)
    return n


cdef inline void _reply_key(const FlowKey *k, const uint8_t *translated, FlowKey *out) noexcept nogil:
    """The key of the reply to a packet with key k whose destination became `translated`."""
    memset(out, 0, sizeof(FlowKey))
    out.family = k.family
    out.proto = k.proto
    memcpy(out.src, translated, 16)
    memcpy(out.dst, k.src, 16)
    out.sport = k.dport
    out.dport = k.sport


cdef inline bint _new_flow_ok(const Parsed *pk) noexcept nogil:
    # A flow needs a 5-tuple: ICMP errors and non-echo ICMP have none, and a
    # later fragment carries no ports.
    return pk.kind == PKT_TCP or pk.kind == PKT_UDP or pk.kind == PKT_ECHO or pk.kind == PKT_OTHER


cdef inline void _lookup_key(const Parsed *pk, FlowKey *key) noexcept nogil:
    if pk.kind == PKT_ICMP_ERROR and (pk.flags & PKF_INNER):
        error_flow_key(pk, key)
    else:
        memcpy(key, &pk.key, sizeof(FlowKey))


cdef int _insert_flow(DpCtx *c, FlowTableC *ft, uint8_t *p, Parsed *pk,
                      const FlowKey *fwd, const uint8_t *fwd_to, const FlowKey *rev,
                      const uint8_t *rev_to, bint from_rev, const uint8_t *transit,
                      uint32_t peer, uint32_t app, uint64_t now) noexcept nogil:
    """Insert a flow (forward direction: DNAT to fwd_to; reverse: SNAT to
    rev_to) and translate its packet pk, which travels the forward direction,
    or the reverse one when `from_rev`."""
    cdef FlowAction fwd_act, rev_act
    memset(&fwd_act, 0, sizeof(FlowAction))
    memset(&rev_act, 0, sizeof(FlowAction))
    fwd_act.rewrite = FT_REWRITE_DST
    memcpy(fwd_act.addr, fwd_to, 16)
    rev_act.rewrite = FT_REWRITE_SRC
    memcpy(rev_act.addr, rev_to, 16)
    if ft_insert(ft, fwd, &fwd_act, rev, &rev_act, peer, transit, app, now) < 0:
        c.counters[C_FLOW_TABLE_FULL] += 1
        return 0
    c.counters[C_FLOWS_CREATED] += 1
    cdef FlowAction *act = &rev_act if from_rev else &fwd_act
    if pk.flags & PKF_FRAG:
        frag_remember(&c.frags, pk, act.rewrite, act.addr, now)
    nat_apply(p, pk, act.rewrite, act.addr)
    c.counters[C_TRANSLATED] += 1
    return 1


cdef inline int _create_flow(DpCore *d, DpCtx *c, FlowTableC *ft, uint8_t *p, Parsed *pk,
                             const uint8_t *new_dst, const uint8_t *transit, uint32_t peer,
                             uint32_t app, uint64_t now) noexcept nogil:
    """The flow of a first packet pk: DNAT to new_dst, SNAT the replies back."""
    cdef FlowKey rev
    _reply_key(&pk.key, new_dst, &rev)
    return _insert_flow(c, ft, p, pk, &pk.key, new_dst, &rev, pk.key.dst, False, transit,
                        peer, app, now)


cdef int _flow_from_return(DpCtx *c, FlowTableC *ft, uint8_t *p, Parsed *pk,
                           const uint8_t *orig_dst, const uint8_t *transit, uint32_t peer,
                           uint32_t app, uint64_t now) noexcept nogil:
    """Re-create the flow of a return packet pk (source: what the forward
    direction was translated to) whose forward packets were sent to
    orig_dst; pk's source becomes orig_dst."""
    cdef FlowKey fwd
    memset(&fwd, 0, sizeof(FlowKey))
    fwd.family = pk.key.family
    fwd.proto = pk.key.proto
    memcpy(fwd.src, pk.key.dst, 16)
    memcpy(fwd.dst, orig_dst, 16)
    fwd.sport = pk.key.dport
    fwd.dport = pk.key.sport
    if not _insert_flow(c, ft, p, pk, &fwd, pk.key.src, &pk.key, orig_dst, True, transit,
                        peer, app, now):
        return 0
    c.counters[C_FLOWS_FROM_RETURN] += 1
    return 1


cdef inline bint _apply_flow(FlowTableC *ft, DpCtx *c, uint8_t *p, Parsed *pk, FlowKey *key,
                             Py_ssize_t n, uint64_t now, FlowHit *hit) noexcept nogil:
    if ft == NULL or not ft_lookup(ft, key, now, <uint32_t>n, hit):
        return False
    if pk.flags & PKF_FRAG:
        frag_remember(&c.frags, pk, hit.act.rewrite, hit.act.addr, now)
    nat_apply(p, pk, hit.act.rewrite, hit.act.addr)
    c.counters[C_TRANSLATED] += 1
    return True


cdef inline bint _apply_fragment(DpCtx *c, uint8_t *p, Parsed *pk, uint64_t now) noexcept nogil:
    cdef int which
    cdef uint8_t addr[16]
    if pk.kind != PKT_FRAGMENT or not frag_lookup(&c.frags, pk, now, &which, addr):
        return False
    nat_apply(p, pk, which, addr)
    c.counters[C_TRANSLATED] += 1
    return True


cdef inline void _count_parse(DpCtx *c, int st) noexcept nogil:
    if st == PARSE_UNSUPPORTED:
        c.counters[C_DROP_UNSUPPORTED] += 1
    elif st != PARSE_OK:
        c.counters[C_DROP_MALFORMED] += 1


cdef inline int _parse_counted(DpCtx *c, const uint8_t *p, Py_ssize_t n, Parsed *pk) noexcept nogil:
    cdef int st = parse(p, n, pk)
    _count_parse(c, st)
    return st


cdef int dp_from_tun(DpCore *d, DpCtx *c, uint8_t *p, Py_ssize_t n, uint64_t now) noexcept nogil:
    """A packet the local kernel sent into the TUN device."""
    cdef Parsed pk
    cdef FlowKey key
    cdef FlowHit hit
    cdef uint8_t transit[16]
    cdef uint8_t dst16[16]
    cdef uint32_t app
    cdef int r
    if _parse_counted(c, p, n, &pk) != PARSE_OK:
        return DP_DROP
    _lookup_key(&pk, &key)
    # Client, outbound (app -> magic); connector, return traffic (real -> client).
    if _apply_flow(d.client_flows, c, p, &pk, &key, n, now, &hit) or \
            _apply_flow(d.connector_flows, c, p, &pk, &key, n, now, &hit):
        if (pk.kind == PKT_ICMP_ERROR and hit.act.rewrite == FT_REWRITE_SRC
                and d.connector_flows != NULL and hit.dir == FT_DIR_REV):
            # An error from a router on the internet side names that router as
            # its source, which the client's anti-spoofing check would drop;
            # present it as coming from the transit IP, as a NAT box would.
            _addr16(dst16, p + (12 if pk.key.family == 4 else 8), pk.key.family)
            if memcmp(dst16, hit.act.addr, 16) != 0:
                rewrite_src(p, &pk, hit.act.addr)
        c.peer = hit.peer
        return DP_TO_PEER
    if _apply_fragment(c, p, &pk, now):
        return _route(d, c, p, &pk)
    if not tb_is_local(d.tables, pk.key.family, pk.key.src):
        if d.connector_flows != NULL and _new_flow_ok(&pk):
            # The reply of a connection that the kernel masqueraded for a
            # flow this node no longer has.
            r = tb_return_transit(d.tables, pk.key.family, pk.key.dst, pk.key.src, transit, &app)
            if r == TB_HIT and tb_route(d.tables, pk.key.family, pk.key.dst, &c.peer):
                if _flow_from_return(c, d.connector_flows, p, &pk, transit, transit, c.peer,
                                     app, now):
                    return DP_TO_PEER
                return DP_DROP
            if r == TB_AMBIGUOUS:
                c.counters[C_DROP_RETURN_AMBIGUOUS] += 1
                return DP_DROP
        c.counters[C_DROP_SRC_NOT_ALLOWED] += 1
        return DP_DROP
    if d.client_flows != NULL:
        r = tb_magic(d.tables, pk.key.family, pk.key.dst, transit)
        if r == TB_HIT:
            if not _new_flow_ok(&pk):
                c.counters[C_DROP_NOT_TRANSLATABLE] += 1
                return DP_DROP
            if not tb_route(d.tables, pk.key.family, transit, &c.peer):
                # The transit IP is not registered with a connector (yet).
                c.counters[C_DROP_NO_ROUTE] += 1
                return DP_DROP
            if not _create_flow(d, c, d.client_flows, p, &pk, transit, transit, c.peer, 0, now):
                return DP_DROP
            return DP_TO_PEER
        if r == TB_UNMAPPED:
            c.counters[C_UNMAPPED_MAGIC] += 1
            c.reply_len = build_unreachable(p, &pk, c.reply, UNREACH_BUF_SIZE)
            return DP_REPLY if c.reply_len > 0 else DP_DROP
    return _route(d, c, p, &pk)


cdef inline int _route(DpCore *d, DpCtx *c, const uint8_t *p, Parsed *pk) noexcept nogil:
    """Plain overlay routing by the (possibly rewritten) destination address."""
    cdef const uint8_t *dst = p + (16 if pk.key.family == 4 else 24)
    cdef uint8_t dst16[16]
    _addr16(dst16, dst, pk.key.family)
    if tb_route(d.tables, pk.key.family, dst16, &c.peer):
        c.counters[C_FORWARDED] += 1
        return DP_TO_PEER
    c.counters[C_DROP_NO_ROUTE] += 1
    return DP_DROP


cdef int dp_from_overlay(DpCore *d, DpCtx *c, uint8_t *p, Py_ssize_t n, uint32_t peer,
                         Parsed *pk, uint64_t now) noexcept nogil:
    """A packet from peer `peer`, already parsed and past the anti-spoofing check."""
    cdef FlowKey key
    cdef FlowHit hit
    cdef uint8_t real[16]
    cdef uint32_t app
    cdef int r
    _lookup_key(pk, &key)
    # Client, return traffic (transit -> app); connector, outbound (client -> transit).
    if _apply_flow(d.client_flows, c, p, pk, &key, n, now, &hit) or \
            _apply_flow(d.connector_flows, c, p, pk, &key, n, now, &hit):
        return DP_TO_TUN
    if _apply_fragment(c, p, pk, now):
        return DP_TO_TUN
    if d.connector_flows != NULL:
        r = tb_transit(d.tables, pk.key.family, pk.key.src, pk.key.dst, real, &app)
        if r == TB_HIT:
            if not _new_flow_ok(pk):
                c.counters[C_DROP_NOT_TRANSLATABLE] += 1
                return DP_DROP
            if not _create_flow(d, c, d.connector_flows, p, pk, real, pk.key.dst, peer, app, now):
                return DP_DROP
            return DP_TO_TUN
        if r == TB_UNMAPPED:
            c.counters[C_UNMAPPED_TRANSIT] += 1
            c.peer = peer
            c.family = pk.key.family
            memcpy(c.transit, pk.key.dst, 16)
            return DP_REJECT
    if not tb_is_local(d.tables, pk.key.family, pk.key.dst):
        c.counters[C_DROP_DST_NOT_ALLOWED] += 1
        return DP_DROP
    if d.client_flows != NULL and \
            tb_magic_for_transit(d.tables, pk.key.family, pk.key.src, real):
        # A reply from a transit IP whose flow this node no longer has. The
        # source check let it in only from the connector that T is routed to;
        # untranslated, a transit IP never reaches the kernel.
        if not _new_flow_ok(pk):
            c.counters[C_DROP_NOT_TRANSLATABLE] += 1
            return DP_DROP
        if _flow_from_return(c, d.client_flows, p, pk, real, pk.key.src, peer, 0, now):
            return DP_TO_TUN
        return DP_DROP
    c.counters[C_FORWARDED] += 1
    return DP_TO_TUN


cdef bint dp_reject_due(DpCore *d, DpCtx *c, uint64_t now) noexcept nogil:
    """Whether to send (and report) the reject in c now: once per transit and
    peer per REJECT_GAP_MS, so a flood of unmapped packets gives few rejects."""
    cdef uint32_t h = <uint32_t>_ft_hash_words(c.transit, 2, c.peer) & (REJECT_MEMO - 1)
    cdef RejectMemo *m = &c.rejects[h]
    if (m.at != 0 and m.peer == c.peer and m.family == c.family
            and memcmp(m.transit, c.transit, 16) == 0 and now - m.at < REJECT_GAP_MS):
        return False
    memcpy(m.transit, c.transit, 16)
    m.peer = c.peer
    m.family = c.family
    m.at = now if now != 0 else 1
    dp_push_event(d, DP_EV_UNMAPPED, c.family, c.peer, c.transit)
    return True
