# The per-packet decisions of both roles (prefix dp_): what happens to one packet that
# came from the TUN device (the local kernel) or from the overlay (a peer).
#
# This is the datapath's sans-IO core: dp_from_tun / dp_datagram take a
# packet or datagram buffer and return a verdict, rewriting the packet in place; the
# pumps (pump.pxi) do the reading and writing around them, and the tests and
# benchmarks drive them through Datapath.process_* without any device.
#
# Client: known flow -> apply; magic IP with an assignment ->
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
# so established flows survive mapping changes.

from libc.stdint cimport uint8_t, uint32_t, uint64_t

from includes.atomic cimport c25_load_u64
from includes.pthread cimport pthread_mutex_t


cdef enum:  # verdicts
    DP_DROP = 0         # drop (a counter says why)
    DP_TO_PEER = 1      # send the (rewritten) packet to peer `DpCtx.peer`
    DP_TO_TUN = 2       # write the (rewritten) packet to the TUN device
    DP_REPLY = 3        # drop; write DpCtx.reply (an ICMP error) to the TUN device
    DP_REJECT = 4       # drop; send a reject naming DpCtx.transit to peer DpCtx.peer
    DP_HANDSHAKE = 5    # a handshake message, queued for the control plane

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
    C_DROP_UNKNOWN_INDEX    # transport data under no session of ours
    C_DROP_SPOOFED          # inner source not one of the sending peer's allowed addresses
    C_DROP_BAD_HEADER       # not a WireGuard message of a valid size
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
    C_TUN_RX_AFTER_WRITE    # TUN packets the UDP -> TUN thread read after its writes
                            # (also in tun_rx)
    C_DROP_DST_NOT_ALLOWED  # from the overlay, untranslated and not to one of our addresses
    C_DROP_SRC_NOT_ALLOWED  # from the TUN, untranslated and not from one of our addresses
    C_DROP_RETURN_AMBIGUOUS # a return packet without flow that maps to several transit IPs
    C_FLOWS_FROM_RETURN     # flows re-created from a return packet (also in flows_created)
    C_DROP_REPLAY           # a counter seen before or behind the replay window
    C_DROP_AUTH             # did not decrypt under the keypair its index names
    C_DROP_EXPIRED          # under a keypair older than REJECT_AFTER_TIME
    C_DROP_NO_ENDPOINT      # to a peer whose endpoint is not known yet
    C_STAGED                # packets kept for a peer until its handshake completes
    C_HANDSHAKES_RECEIVED   # handshake messages queued for the control plane
    C_HANDSHAKES_DROPPED    # ... and dropped because that queue was full
    C_CRYPTO_ERRORS         # the crypto library failed (never expected)
    C_TUN_TX_COALESCED      # packets written inside super-packets (also in tun_tx)
    C_TUN_SUPER_PACKETS     # super-packets written (coalesce.pxd)
    C_SPINS                 # isolated packets after which the overlay socket was polled
    C_SPIN_HITS             # ... and the answer came within the spin
    C_TUN_RX_SUPER          # TSO/USO super-packets read from the TUN (segment.pxd; in tun_rx)
    C_TUN_RX_SEGMENTS       # packets they were split into
    C_DROP_OFFLOAD_HEADER   # a virtio-net header we cannot honour (unknown type or flag,
                            # gso_size 0, checksum fields that do not fit the packet)
    C_DROP_OFFLOAD_PACKET   # a super-packet that does not fit its GSO type or its lengths
    C_DROP_OFFLOAD_UNSUPPORTED  # a super-packet we do not split (IPv6 extension headers)
    C_NCOUNTERS


cdef enum:
    REJECT_MEMO = 64        # recent rejects remembered per thread, to send one per transit per
    REJECT_GAP_MS = 500     # ... REJECT_GAP_MS rather than one per dropped packet
    DP_EV_CAP = 4096        # datapath events waiting for the control plane
    DP_HS_CAP = 1024        # handshake messages waiting for it (wireguard-go's queue);
                            # an eighth of it waiting means "under load"

cdef enum:  # datapath events (flow events live in the flow tables' rings)
    DP_EV_REJECT = 1        # a peer rejected our transit IP: re-register it
    DP_EV_UNMAPPED = 2      # we rejected a peer's unmapped transit IP
    DP_EV_HANDSHAKE = 3     # a peer needs a handshake (no session, or one due for rekey)
    DP_EV_CONFIRMED = 4     # a peer's next keypair was confirmed and is current now
    DP_EV_UNKNOWN_INDEX = 5 # transport data under no session of ours, from an endpoint (at
                            # most one per UNKNOWN_GAP_MS per thread): a peer that restarted?
    UNKNOWN_GAP_MS = 100


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
    uint8_t reject_to[16]   # DP_REJECT: the peer's overlay address the reject goes to
    uint8_t family          # DP_REJECT: their family
    uint32_t peer           # DP_TO_PEER / DP_REJECT
    Py_ssize_t inner_len    # DP_TO_TUN / DP_REJECT from dp_datagram: the inner packet's length
    AeadCtx *aead           # this side's cipher context
    uint64_t unknown_at     # when the last DP_EV_UNKNOWN_INDEX was pushed


cdef struct DpEvent:
    uint8_t kind
    uint8_t family
    uint32_t peer
    uint8_t transit[16]


cdef struct HsMsg:          # a handshake message and where it came from
    TbEndpoint sender
    uint16_t len
    uint8_t data[<int>WG_HANDSHAKE_MAX]


cdef struct DpCore:         # what the per-packet code needs, as raw pointers
    TablesC *tables
    FlowTableC *client_flows    # NULL unless the node is a client
    FlowTableC *connector_flows # NULL unless the node is a connector
    pthread_mutex_t ev_lock
    DpEvent *events
    uint32_t ev_start
    uint32_t ev_len
    uint64_t ev_dropped
    uint64_t ev_pushed          # events ever queued (dp_event_seq), handshakes included
    HsMsg *hs                   # handshake messages, under ev_lock
    uint32_t hs_start
    uint32_t hs_len


cdef struct InboundMemo:    # the last anti-spoofing verdict of a receive batch
    uint8_t src[16]
    uint32_t peer
    uint8_t src_family
    int result              # 1 allowed, 0 not, -1: nothing remembered


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


cdef inline void dp_count_parse(DpCtx *c, int st) noexcept nogil:
    if st == PARSE_UNSUPPORTED:
        c.counters[C_DROP_UNSUPPORTED] += 1
    elif st != PARSE_OK:
        c.counters[C_DROP_MALFORMED] += 1


cdef void dp_push_event(DpCore *d, uint8_t kind, uint8_t family, uint32_t peer,
                        const uint8_t *transit) noexcept nogil
cdef int dp_from_tun(DpCore *d, DpCtx *c, uint8_t *p, Py_ssize_t n, uint64_t now) noexcept nogil
cdef int dp_from_overlay(DpCore *d, DpCtx *c, uint8_t *p, Py_ssize_t n, uint32_t peer,
                         Parsed *pk, uint64_t now) noexcept nogil
cdef int dp_datagram(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, const TbEndpoint *sender,
                     uint64_t now, uint32_t *peer, InboundMemo *memo) noexcept nogil
cdef Py_ssize_t dp_seal(DpCore *d, DpCtx *c, uint8_t *dg, Py_ssize_t n, uint64_t now,
                        TbEndpoint *ep) noexcept nogil
cdef Py_ssize_t dp_seal_reject(DpCore *d, DpCtx *c, uint8_t *dg, uint64_t now,
                               TbEndpoint *ep) noexcept nogil
cdef bint dp_reject_due(DpCore *d, DpCtx *c, uint64_t now) noexcept nogil
