# The per-packet decisions; what they decide and their types are in datapath.pxd.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from includes.pthread cimport pthread_mutex_lock, pthread_mutex_unlock


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


cdef inline void _reply_key(const FlowKey *k, const uint8_t *translated,
                            FlowKey *out) noexcept nogil:
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
        pk_error_flow_key(pk, key)
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
        nat_frag_remember(&c.frags, pk, act.rewrite, act.addr, now)
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
        nat_frag_remember(&c.frags, pk, hit.act.rewrite, hit.act.addr, now)
    nat_apply(p, pk, hit.act.rewrite, hit.act.addr)
    c.counters[C_TRANSLATED] += 1
    return True


cdef inline bint _apply_fragment(DpCtx *c, uint8_t *p, Parsed *pk, uint64_t now) noexcept nogil:
    cdef int which
    cdef uint8_t addr[16]
    if pk.kind != PKT_FRAGMENT or not nat_frag_lookup(&c.frags, pk, now, &which, addr):
        return False
    nat_apply(p, pk, which, addr)
    c.counters[C_TRANSLATED] += 1
    return True


cdef inline int _parse_counted(DpCtx *c, const uint8_t *p, Py_ssize_t n, Parsed *pk) noexcept nogil:
    cdef int st = pk_parse(p, n, pk)
    dp_count_parse(c, st)
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
            c25_addr16(dst16, p + (12 if pk.key.family == 4 else 8), pk.key.family)
            if memcmp(dst16, hit.act.addr, 16) != 0:
                nat_rewrite_addr(p, &pk, NAT_SRC, hit.act.addr)
        c.peer = hit.peer
        return DP_TO_PEER
    if _apply_fragment(c, p, &pk, now):
        return _route(d, c, p, &pk)
    if not tb_is_local(d.tables, pk.key.family, pk.key.src):
        if d.connector_flows != NULL and _new_flow_ok(&pk):
            # The reply of a connection that the kernel masqueraded for a
            # flow this node no longer has.
            r = TB_NOT_OURS
            if tb_route(d.tables, pk.key.family, pk.key.dst, &c.peer):
                r = tb_return_transit(d.tables, pk.key.family, c.peer, pk.key.src, transit,
                                      &app)
            if r == TB_HIT:
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
            c.reply_len = icmp_build_unreachable(p, &pk, c.reply, UNREACH_BUF_SIZE)
            return DP_REPLY if c.reply_len > 0 else DP_DROP
    return _route(d, c, p, &pk)


cdef inline int _route(DpCore *d, DpCtx *c, const uint8_t *p, Parsed *pk) noexcept nogil:
    """Plain overlay routing by the (possibly rewritten) destination address."""
    cdef const uint8_t *dst = p + (16 if pk.key.family == 4 else 24)
    cdef uint8_t dst16[16]
    c25_addr16(dst16, dst, pk.key.family)
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
        r = tb_transit(d.tables, pk.key.family, peer, pk.key.dst, real, &app)
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
            memcpy(c.reject_to, pk.key.src, 16)
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
    cdef uint32_t h = <uint32_t>c25_hash_words(c.transit, 2, c.peer) & (REJECT_MEMO - 1)
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


cdef inline bint _source_ok(TablesC *t, InboundMemo *memo, uint32_t peer, uint8_t family,
                            const uint8_t *src) noexcept nogil:
    """tb_source_ok, remembered for one receive batch: its datagrams mostly
    share peer and inner source (all of them do within a GRO message), and
    each is then checked against the tables as they were for the first of
    them, a copy taken under the lock, never a torn entry."""
    if memo == NULL:
        return tb_source_ok(t, peer, family, src)
    if (memo.result >= 0 and memo.peer == peer and memo.src_family == family
            and memcmp(memo.src, src, 16) == 0):
        return memo.result == 1
    memo.result = 1 if tb_source_ok(t, peer, family, src) else 0
    memo.peer = peer
    memo.src_family = family
    memcpy(memo.src, src, 16)
    return memo.result == 1


cdef void _push_handshake(DpCore *d, DpCtx *c, const uint8_t *dg, Py_ssize_t n,
                          const TbEndpoint *sender) noexcept nogil:
    cdef HsMsg *m
    pthread_mutex_lock(&d.ev_lock)
    if d.hs_len == DP_HS_CAP:
        c.counters[C_HANDSHAKES_DROPPED] += 1
    else:
        m = &d.hs[(d.hs_start + d.hs_len) % DP_HS_CAP]
        m.sender = sender[0]
        m.len = <uint16_t>n
        memcpy(m.data, dg, n)
        d.hs_len += 1
        d.ev_pushed += 1
        c.counters[C_HANDSHAKES_RECEIVED] += 1
    pthread_mutex_unlock(&d.ev_lock)


cdef inline void _session_events(DpCore *d, uint32_t peer, int flags) noexcept nogil:
    cdef uint8_t none[16]
    if flags & (SS_F_CONFIRMED | SS_F_WANT_HANDSHAKE):
        memset(none, 0, 16)
        if flags & SS_F_CONFIRMED:
            dp_push_event(d, DP_EV_CONFIRMED, 0, peer, none)
        if flags & SS_F_WANT_HANDSHAKE:
            dp_push_event(d, DP_EV_HANDSHAKE, 0, peer, none)


cdef int _open(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const TbEndpoint *sender,
               uint64_t now, uint32_t *peer) noexcept nogil:
    """Authenticate and decrypt one transport message in place; the payload's
    length (0: a keepalive), or -1 to drop it (counted)."""
    cdef SsRecv rx
    cdef uint32_t index = wire_le32(dg + 4)
    cdef uint64_t counter = wire_le64(dg + 8)
    cdef Py_ssize_t plen
    cdef int r = ss_recv_begin(d.tables, index, counter, now, &rx)
    if r == SS_RX_UNKNOWN_INDEX and now - c.unknown_at >= UNKNOWN_GAP_MS:
        # The control plane may start a handshake with the peer at that endpoint.
        c.unknown_at = now
        dp_push_event(d, DP_EV_UNKNOWN_INDEX, sender.family, sender.port, sender.addr)
    if r != SS_RX_OK:
        c.counters[C_DROP_UNKNOWN_INDEX if r == SS_RX_UNKNOWN_INDEX else
                   C_DROP_EXPIRED if r == SS_RX_EXPIRED else C_DROP_REPLAY] += 1
        return -1
    peer[0] = rx.peer
    plen = aead_open(c.aead, rx.key, counter, dg + WG_HDR, n - WG_HDR)
    memset(rx.key, 0, 32)
    if plen < 0:
        c.counters[C_DROP_AUTH] += 1
        ss_count_drop(d.tables, rx.peer, SS_D_AUTH)
        return -1
    r = ss_recv_done(d.tables, rx.peer, index, counter, sender, plen, now)
    if r & (SS_F_REPLAY | SS_F_GONE):
        c.counters[C_DROP_REPLAY if r & SS_F_REPLAY else C_DROP_UNKNOWN_INDEX] += 1
        return -1
    _session_events(d, rx.peer, r)
    return plen


cdef int dp_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const TbEndpoint *sender,
                     uint64_t now, uint32_t *peer, InboundMemo *memo) noexcept nogil:
    """One datagram from the overlay, sent from `sender`: the verdict for its
    inner packet (DP_TO_TUN or DP_REJECT, the packet at dg + WG_HDR and
    c.inner_len bytes long; DP_HANDSHAKE; DP_DROP). Rejects received become
    events."""
    cdef Parsed pk
    cdef uint8_t transit[16]
    cdef uint8_t family
    cdef Py_ssize_t plen
    cdef uint8_t *p = dg + WG_HDR
    cdef int t = wire_type(dg, n)
    c.counters[C_UDP_RX] += 1
    if t == 0 or sender.family == 0:
        c.counters[C_DROP_BAD_HEADER] += 1
        return DP_DROP
    if t != WG_TRANSPORT:
        _push_handshake(d, c, dg, n, sender)
        return DP_HANDSHAKE
    plen = _open(d, c, dg, n, sender, now, peer)
    if plen < 0:
        return DP_DROP
    if plen == 0:
        c.counters[C_KEEPALIVES_RECEIVED] += 1
        return DP_DROP
    # The plaintext is padded to 16 bytes; the IP header says where it ends.
    plen = wire_ip_len(p, plen)
    if plen < 0 or _parse_counted(c, p, plen, &pk) != PARSE_OK:
        if plen < 0:
            c.counters[C_DROP_MALFORMED] += 1
        return DP_DROP
    # Cryptokey routing: the inner source must be one of the sending peer's
    # allowed addresses (its overlay addresses, transit IPs routed to it).
    if not _source_ok(d.tables, memo, peer[0], pk.key.family, pk.key.src):
        c.counters[C_DROP_SPOOFED] += 1
        ss_count_drop(d.tables, peer[0], SS_D_SPOOFED)
        return DP_DROP
    c.inner_len = plen
    if pk.kind == PKT_OTHER and pk.key.proto == WIRE_REJECT_PROTO \
            and tb_is_local(d.tables, pk.key.family, pk.key.dst):
        family = wire_reject_transit(p, plen, pk.key.family, transit)
        if family == 0:
            c.counters[C_DROP_MALFORMED] += 1
        elif not tb_source_ok(d.tables, peer[0], family, transit):
            # Believed only from the connector the transit IP is registered with: another
            # member could otherwise make us re-register our mappings.
            c.counters[C_DROP_SPOOFED] += 1
            ss_count_drop(d.tables, peer[0], SS_D_SPOOFED)
        else:
            c.counters[C_REJECTS_RECEIVED] += 1
            dp_push_event(d, DP_EV_REJECT, family, peer[0], transit)
        return DP_DROP
    return dp_from_overlay(d, c, p, plen, peer[0], &pk, now)


cdef Py_ssize_t dp_seal(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, uint64_t now,
                        TbEndpoint *ep) noexcept nogil:
    """Seal the packet at dg + WG_HDR (n bytes; 0: a keepalive; WG_PAD +
    AEAD_TAG bytes of room after it) in place into a transport message to
    peer c.peer, and say where it goes (*ep). Its length, or 0 when it is not
    sent now: staged until a handshake completes, or dropped (counted)."""
    cdef SsSend tx
    cdef int flags
    cdef Py_ssize_t padded = wire_padded(n)
    cdef int r = ss_send_begin(d.tables, c.peer, n, now, &tx, &flags)
    _session_events(d, c.peer, flags)
    if r != SS_OK:
        if r == SS_NO_SESSION:
            if n and ss_stage(d.tables, c.peer, dg + WG_HDR, n):
                c.counters[C_STAGED] += 1
        else:
            c.counters[C_DROP_NO_ENDPOINT if r == SS_NO_ENDPOINT else C_DROP_NO_ROUTE] += 1
        return 0
    memset(dg + WG_HDR + n, 0, padded - n)
    r = aead_seal(c.aead, tx.key, tx.counter, dg + WG_HDR, padded)
    memset(tx.key, 0, 32)
    if r < 0:
        c.counters[C_CRYPTO_ERRORS] += 1
        return 0
    wire_transport_header(dg, tx.remote_index, tx.counter)
    ep[0] = tx.ep
    return WG_HDR + padded + AEAD_TAG


cdef Py_ssize_t dp_seal_reject(DpCore *d, DpCtx *c, uint8_t *dg, uint64_t now,
                               TbEndpoint *ep) noexcept nogil:
    """The reject that c names (DP_REJECT), sealed at dg (WG_HDR +
    WIRE_REJECT_MAX + WG_PAD + AEAD_TAG bytes) for peer c.peer; 0 if none
    can go (no overlay address of ours of that family; or see dp_seal)."""
    cdef uint8_t src[16]
    if not tb_local_of(d.tables, c.family, src):
        return 0
    n = wire_reject(dg + WG_HDR, c.family, src, c.reject_to, c.transit)
    return dp_seal(d, c, dg, n, now, ep)
