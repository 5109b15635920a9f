# WireGuard sessions in the datapath (prefix ss_): per peer, the keypairs the
# control plane installed (current, previous, next) with their send counters
# and replay windows, the endpoint its datagrams go to (configured, then the
# source of its latest authenticated datagram: roaming), the activity stamps
# the control plane's timers read, per-peer byte and drop counts, and the
# packets staged while the peer has no usable session.
#
# Everything lives in the peer's record in the tables (TbPeer.wg), under the
# tables' lock; a receiver index leads to its peer through the tables' index
# map. Keys are copied out under the lock and the AEAD runs outside it; the
# counter a sender takes is reserved under the lock, so two threads sealing
# for one peer never reuse a nonce. A counter is marked in the replay window
# only after its datagram authenticated, so forged counters move nothing.
#
# The rotation rules are the handshake's (core/wireguard/peer.py holds the
# reference): an initiator's new keypair becomes current at once (the old
# current becomes previous; but an unconfirmed next, left by crossing
# handshakes, becomes previous instead, as the peer sends under it); a responder's
# becomes next and is confirmed, becoming current, by the first datagram that
# authenticates under it. The datapath refuses keypairs older than
# REJECT_AFTER_TIME and asks the control plane for a handshake (an event)
# when a send finds none, or an initiator's keypair is due for a rekey.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    SS_CURRENT = 0
    SS_PREVIOUS = 1
    SS_NEXT = 2
    SS_SLOTS = 3
    SS_STAGED = 128                 # packets staged per peer without a session (wireguard-go's)
    SS_STAGED_BYTES = 1 << 20       # ... and at most this many bytes of them
    SS_REKEY_AFTER_MS = 120000
    SS_REJECT_AFTER_MS = 180000
    SS_REKEY_ON_RECV_MS = 165000    # REJECT_AFTER - KEEPALIVE - REKEY_TIMEOUT

cdef enum:  # per-peer drops, by reason
    SS_D_REPLAY = 0                 # a counter seen before, or too old for the window
    SS_D_AUTH                       # did not decrypt under the keypair its index names
    SS_D_EXPIRED                    # its keypair is older than REJECT_AFTER_TIME
    SS_D_SPOOFED                    # inner source not one of the peer's allowed addresses
    SS_D_NO_ENDPOINT                # to a peer whose endpoint is not known (yet)
    SS_D_STAGED_OVERFLOW            # staged packets pushed out by newer ones
    SS_D_N

cdef enum:  # ss_send_begin
    SS_OK = 0
    SS_NO_SESSION = 1               # stage the packet: a handshake was asked for
    SS_NO_ENDPOINT = 2
    SS_NO_PEER = 3

cdef enum:  # ss_recv_begin
    SS_RX_OK = 0
    SS_RX_UNKNOWN_INDEX = 1
    SS_RX_EXPIRED = 2
    SS_RX_REPLAY = 3

cdef enum:  # ss_recv_done / ss_send_begin flags
    SS_F_CONFIRMED = 1              # a responder's next keypair became current
    SS_F_WANT_HANDSHAKE = 2         # tell the control plane (first time since it last looked)
    SS_F_REPLAY = 4                 # the counter was taken meanwhile (a race): drop
    SS_F_GONE = 8                   # the keypair was replaced meanwhile: drop


cdef struct SsKeypair:
    uint8_t send_key[32]
    uint8_t recv_key[32]
    uint64_t send_counter           # the next one to use
    uint64_t created_ms
    ReplayWin window
    uint32_t local_index
    uint32_t remote_index
    uint8_t used
    uint8_t initiator
    uint8_t rekey_asked             # the handshake its age calls for was asked for

cdef struct SsStaged:
    uint8_t *pkts[<int>SS_STAGED]   # malloc'd copies, oldest at `start`
    uint32_t lens[<int>SS_STAGED]
    uint32_t start
    uint32_t count
    uint64_t bytes

cdef struct SsPeer:
    SsKeypair kp[<int>SS_SLOTS]
    TbEndpoint ep                   # where its datagrams go (family 0: not known yet)
    TbEndpoint configured           # the tailnet file's endpoint (family 0: none)
    uint64_t ep_learned_ms          # when ep was learned from a datagram (0: configured)
    uint64_t rx_bytes
    uint64_t tx_bytes
    uint64_t last_tx_ms             # any datagram sealed for it
    uint64_t last_rx_ms             # any datagram that authenticated
    uint64_t tx_unanswered_ms       # first data sent since the last authenticated receive
    uint64_t rx_unanswered_ms       # first data received since the last send
    uint64_t drops[<int>SS_D_N]
    uint8_t want_handshake          # raised, not yet taken by the control plane
    SsStaged staged

cdef struct SsSend:                 # what sealing one datagram needs, copied out
    uint8_t key[32]
    uint64_t counter
    uint32_t remote_index
    TbEndpoint ep

cdef struct SsRecv:
    uint8_t key[32]
    uint32_t peer


cdef int ss_send_begin(TablesC *t, uint32_t peer, Py_ssize_t n, uint64_t now,
                       SsSend *out, int *flags) noexcept nogil
cdef int ss_recv_begin(TablesC *t, uint32_t index, uint64_t counter, uint64_t now,
                       SsRecv *out) noexcept nogil
cdef int ss_recv_done(TablesC *t, uint32_t peer, uint32_t index, uint64_t counter,
                      const TbEndpoint *sender, Py_ssize_t n, uint64_t now) noexcept nogil
cdef void ss_learn_endpoint(SsPeer *s, const TbEndpoint *ep, uint64_t now) noexcept nogil
cdef void ss_count_drop(TablesC *t, uint32_t peer, int reason) noexcept nogil
cdef bint ss_stage(TablesC *t, uint32_t peer, const uint8_t *p, Py_ssize_t n) noexcept nogil
cdef uint32_t ss_take_staged(TablesC *t, uint32_t peer, SsStaged *out) noexcept nogil
cdef void ss_free_staged(SsStaged *s) noexcept nogil
cdef int ss_install(TablesC *t, uint32_t peer, const SsKeypair *kp, bint as_next) noexcept nogil
cdef void ss_carry(SsPeer *to, SsPeer *old) noexcept nogil
cdef void ss_unindex(TablesC *t, SsPeer *s) noexcept nogil
