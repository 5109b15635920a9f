# WireGuard sessions of the peers; what they hold and why is in session.pxd.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from includes.pthread cimport pthread_mutex_lock, pthread_mutex_unlock

cdef uint64_t SS_REKEY_AFTER_MESSAGES = (<uint64_t>1) << 60


cdef inline bint _ss_live(const SsKeypair *kp, uint64_t now) noexcept nogil:
    return kp.used and now - kp.created_ms < SS_REJECT_AFTER_MS


cdef inline void _ss_index_put(TablesC *t, uint32_t index, uint32_t peer) noexcept nogil:
    cdef TbKey k
    cdef TbVal v
    _tb_key(&k, 0, NULL, index)
    memset(&v, 0, sizeof(TbVal))
    v.u32 = peer
    _tb_put(&t.indices, &k, &v, t.seed, NULL)  # space reserved by the caller


cdef inline void _ss_drop(TablesC *t, SsKeypair *kp) noexcept nogil:
    """Forget a keypair: its index leaves the map, its keys are wiped."""
    cdef TbKey k
    if kp.used:
        _tb_key(&k, 0, NULL, kp.local_index)
        _tb_del(&t.indices, &k, t.seed, NULL)
    memset(kp, 0, sizeof(SsKeypair))


cdef inline SsKeypair *_ss_keypair(TbPeer *rec, uint32_t index) noexcept nogil:
    """The keypair of `rec` that receiver index `index` names, or NULL."""
    cdef int i
    if rec != NULL:
        for i in range(SS_SLOTS):
            if rec.wg.kp[i].used and rec.wg.kp[i].local_index == index:
                return &rec.wg.kp[i]
    return NULL


cdef void ss_learn_endpoint(SsPeer *s, const TbEndpoint *ep, uint64_t now) noexcept nogil:
    """`ep` is where the peer's latest authenticated message came from (roaming)."""
    if ep.family and (ep.family != s.ep.family or ep.port != s.ep.port
                      or memcmp(ep.addr, s.ep.addr, 16) != 0):
        s.ep = ep[0]
        s.ep_learned_ms = now


cdef inline void _ss_want(SsPeer *s, int *flags) noexcept nogil:
    if not s.want_handshake:
        s.want_handshake = 1
        flags[0] |= SS_F_WANT_HANDSHAKE


cdef int ss_send_begin(TablesC *t, uint32_t peer, Py_ssize_t n, uint64_t now,
                       SsSend *out, int *flags) noexcept nogil:
    """Reserve the next counter of `peer`'s current keypair for an n-byte
    payload (0: a keepalive) and copy out what sealing needs; or say why not.
    *flags gets SS_F_WANT_HANDSHAKE when the control plane should start one."""
    cdef TbPeer *rec
    cdef SsPeer *s
    cdef SsKeypair *kp
    flags[0] = 0
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    if rec == NULL:
        pthread_mutex_unlock(&t.lock)
        return SS_NO_PEER
    s = &rec.wg
    kp = &s.kp[SS_CURRENT]
    if s.ep.family == 0:
        # Nowhere to send it, session or not (a keypair installed before the peer's
        # address was known); nor a handshake to ask for, which needs one too.
        s.drops[SS_D_NO_ENDPOINT] += 1
        pthread_mutex_unlock(&t.lock)
        return SS_NO_ENDPOINT
    if not _ss_live(kp, now) or kp.send_counter >= REJECT_AFTER_MESSAGES:
        _ss_want(s, flags)
        pthread_mutex_unlock(&t.lock)
        return SS_NO_SESSION
    memcpy(out.key, kp.send_key, 32)
    out.counter = kp.send_counter
    kp.send_counter += 1
    out.remote_index = kp.remote_index
    out.ep = s.ep
    if kp.initiator and not kp.rekey_asked and (
            now - kp.created_ms >= SS_REKEY_AFTER_MS
            or kp.send_counter >= SS_REKEY_AFTER_MESSAGES):
        kp.rekey_asked = 1
        _ss_want(s, flags)
    # The bytes on the wire, as rx_bytes counts them (and wg show): padding included.
    s.tx_bytes += <uint64_t>wire_padded(n) + WG_OVERHEAD
    s.last_tx_ms = now
    s.rx_unanswered_ms = 0
    if n and s.tx_unanswered_ms == 0:
        s.tx_unanswered_ms = now
    pthread_mutex_unlock(&t.lock)
    return SS_OK


cdef int ss_recv_begin(TablesC *t, uint32_t index, uint64_t counter, uint64_t now,
                       SsRecv *out) noexcept nogil:
    """The key and peer of receiver index `index`, if `counter` may be fresh."""
    cdef TbKey k
    cdef TbRef slot
    cdef TbPeer *rec
    cdef SsKeypair *kp
    cdef int r = SS_RX_UNKNOWN_INDEX
    _tb_key(&k, 0, NULL, index)
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, slot.u32[0]) if _tb_find(&t.indices, &k, t.seed, &slot) else NULL
    kp = _ss_keypair(rec, index)
    if kp != NULL:
        out.peer = slot.u32[0]
        if not _ss_live(kp, now):
            rec.wg.drops[SS_D_EXPIRED] += 1
            r = SS_RX_EXPIRED
        elif not rw_fresh(&kp.window, counter):
            rec.wg.drops[SS_D_REPLAY] += 1
            r = SS_RX_REPLAY
        else:
            memcpy(out.key, kp.recv_key, 32)
            r = SS_RX_OK
    pthread_mutex_unlock(&t.lock)
    return r


cdef int ss_recv_done(TablesC *t, uint32_t peer, uint32_t index, uint64_t counter,
                      const TbEndpoint *sender, Py_ssize_t n, uint64_t now) noexcept nogil:
    """A datagram under `index` authenticated: mark its counter, learn the
    sender as the peer's endpoint, confirm a next keypair. SS_F_* flags."""
    cdef TbPeer *rec
    cdef SsPeer *s
    cdef SsKeypair *kp
    cdef int flags = 0
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    kp = _ss_keypair(rec, index)
    if kp == NULL:
        pthread_mutex_unlock(&t.lock)
        return SS_F_GONE
    s = &rec.wg
    if not rw_accept(&kp.window, counter):
        s.drops[SS_D_REPLAY] += 1
        pthread_mutex_unlock(&t.lock)
        return SS_F_REPLAY
    if kp == &s.kp[SS_NEXT]:
        # The initiator used the new keypair: it is confirmed.
        _ss_drop(t, &s.kp[SS_PREVIOUS])
        s.kp[SS_PREVIOUS] = s.kp[SS_CURRENT]
        s.kp[SS_CURRENT] = s.kp[SS_NEXT]
        memset(&s.kp[SS_NEXT], 0, sizeof(SsKeypair))
        kp = &s.kp[SS_CURRENT]
        flags |= SS_F_CONFIRMED
    ss_learn_endpoint(s, sender, now)
    s.rx_bytes += <uint64_t>n + 32
    s.last_rx_ms = now
    s.tx_unanswered_ms = 0
    if n and s.rx_unanswered_ms == 0:
        s.rx_unanswered_ms = now
    kp = &s.kp[SS_CURRENT]
    if (kp.used and kp.initiator and not kp.rekey_asked
            and now - kp.created_ms >= SS_REKEY_ON_RECV_MS):
        kp.rekey_asked = 1
        _ss_want(s, &flags)
    pthread_mutex_unlock(&t.lock)
    return flags


cdef void ss_count_drop(TablesC *t, uint32_t peer, int reason) noexcept nogil:
    cdef TbPeer *rec
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    if rec != NULL:
        rec.wg.drops[reason] += 1
    pthread_mutex_unlock(&t.lock)


cdef bint ss_stage(TablesC *t, uint32_t peer, const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Keep a copy of a packet for `peer` until its handshake completes; the
    oldest go when the stage is full (counted). False if it was not kept."""
    cdef TbPeer *rec
    cdef SsStaged *st
    cdef uint8_t *copy
    cdef uint32_t i
    if n <= 0 or n > SS_STAGED_BYTES:
        return False
    copy = <uint8_t *>malloc(n)
    if copy == NULL:
        return False
    memcpy(copy, p, n)
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    if rec == NULL:
        pthread_mutex_unlock(&t.lock)
        free(copy)
        return False
    st = &rec.wg.staged
    while st.count and (st.count == SS_STAGED or st.bytes + <uint64_t>n > SS_STAGED_BYTES):
        i = st.start
        st.bytes -= st.lens[i]
        free(st.pkts[i])
        st.pkts[i] = NULL
        st.start = (st.start + 1) % SS_STAGED
        st.count -= 1
        rec.wg.drops[SS_D_STAGED_OVERFLOW] += 1
    i = (st.start + st.count) % SS_STAGED
    st.pkts[i] = copy
    st.lens[i] = <uint32_t>n
    st.count += 1
    st.bytes += <uint64_t>n
    pthread_mutex_unlock(&t.lock)
    return True


cdef uint32_t ss_take_staged(TablesC *t, uint32_t peer, SsStaged *out) noexcept nogil:
    """Move `peer`'s staged packets to *out (the caller frees them); how many."""
    cdef TbPeer *rec
    memset(out, 0, sizeof(SsStaged))
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    if rec != NULL:
        memcpy(out, &rec.wg.staged, sizeof(SsStaged))
        memset(&rec.wg.staged, 0, sizeof(SsStaged))
    pthread_mutex_unlock(&t.lock)
    return out.count


cdef void ss_free_staged(SsStaged *st) noexcept nogil:
    cdef int i
    for i in range(SS_STAGED):
        free(st.pkts[i])
        st.pkts[i] = NULL
    st.count = 0
    st.bytes = 0


cdef int ss_install(TablesC *t, uint32_t peer, const SsKeypair *kp, bint as_next) noexcept nogil:
    """Install a keypair a handshake produced: as current (we initiated) or
    as next (we responded; confirmed by its first datagram). 0, -1 if out of
    memory, -2 if there is no such peer; on failure nothing changed."""
    cdef TbPeer *rec
    cdef SsPeer *s
    pthread_mutex_lock(&t.lock)
    rec = tb_peer_locked(t, peer)
    if rec == NULL:
        pthread_mutex_unlock(&t.lock)
        return -2
    if _tb_reserve(&t.indices, 0, 1) < 0:
        pthread_mutex_unlock(&t.lock)
        return -1
    s = &rec.wg
    if as_next:
        _ss_drop(t, &s.kp[SS_NEXT])
        _ss_drop(t, &s.kp[SS_PREVIOUS])
        s.kp[SS_NEXT] = kp[0]
        s.kp[SS_NEXT].used = 1
    else:
        _ss_drop(t, &s.kp[SS_PREVIOUS])
        if s.kp[SS_NEXT].used:
            # Crossing handshakes: the peer sends under the one we answered, so that one
            # stays (its index mapped) and the old current goes.
            _ss_drop(t, &s.kp[SS_CURRENT])
            s.kp[SS_PREVIOUS] = s.kp[SS_NEXT]
            memset(&s.kp[SS_NEXT], 0, sizeof(SsKeypair))
        else:
            s.kp[SS_PREVIOUS] = s.kp[SS_CURRENT]
        s.kp[SS_CURRENT] = kp[0]
        s.kp[SS_CURRENT].used = 1
    _ss_index_put(t, kp.local_index, peer)
    s.want_handshake = 0
    pthread_mutex_unlock(&t.lock)
    return 0


cdef void ss_carry(SsPeer *to, SsPeer *old) noexcept nogil:
    """A replaced peer record's state moves to its successor (under the lock).
    A changed configured endpoint wins over a learned one."""
    cdef TbEndpoint configured = to.configured
    memcpy(to, old, sizeof(SsPeer))
    memset(&old.staged, 0, sizeof(SsStaged))
    if (configured.family != old.configured.family or configured.port != old.configured.port
            or memcmp(configured.addr, old.configured.addr, 16) != 0):
        to.configured = configured
        if configured.family:
            to.ep = configured
            to.ep_learned_ms = 0


cdef void ss_unindex(TablesC *t, SsPeer *s) noexcept nogil:
    """Remove a peer's keypairs from the index map (under the lock)."""
    cdef int i
    for i in range(SS_SLOTS):
        _ss_drop(t, &s.kp[i])
