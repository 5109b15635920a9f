# The pumps (prefix pump_): threads that move packets between the TUN device and the
# overlay's UDP socket, with the GIL released for their whole loop: one pair per
# queue (a TUN queue fd and an overlay socket, "Queues" below), two with one queue.
#
#   TUN -> UDP: read every packet that is ready (up to PUMP_BATCH), decide
#               each with dp_from_tun, seal it in place into a WireGuard
#               transport message (dp_seal), send the batch with one sendmmsg.
#               Consecutive datagrams to the same peer of the same length
#               (the last may be shorter) go as one UDP GSO message, so the
#               kernel walks its IP/UDP output path (and, across a veth, the
#               receiver's input path) once per group rather than once per
#               packet (bench/NOTES.md has the profile that showed this cost).
#   UDP -> TUN: recvmmsg up to PUMP_BATCH messages (with UDP_GRO on, one
#               message can hold several datagrams of the same sender, split
#               here at the size the kernel reports), open each (its session,
#               replay window and inner source checked), decide with
#               dp_datagram, write the packets to the TUN device (TCP segments
#               of a flow joined into super-packets, coalesce.pxd); handshake
#               messages are queued for the control plane.
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
# Isolated packets. A ping or a keystroke after a quiet spell finds both
# threads asleep, and every hop of its round trip pays a thread wake-up (~36 us
# on a VM whose idle vCPU halts). So after a batch of at most SPIN_PACKETS read
# from the TUN after SPIN_QUIET_NS of quiet, the TUN -> UDP thread polls the
# overlay socket itself for up to SPIN_NS, taking the UDP side's lock
# (PumpBufs.udp_lock, which the UDP -> TUN thread holds per batch) and its
# context and buffers: the answer is delivered from there without waiting for
# the other thread to wake, and that thread is not woken for it meanwhile (its
# epoll interest in the socket is off during the spin). Bounded: at most 1/SPIN_SHARE of the thread's time
# goes to it (a budget refilled as time passes), and a stream never spins (its
# batches are not isolated). Counted: spins, spin_hits.
#
# Each batch slot is a PUMP_SLOT-byte buffer with WG_HDR bytes of headroom,
# so the WireGuard header is written in front of a TUN packet without a copy
# (with IFF_VNET_HDR, the virtio-net header is read into that room too),
# and a GSO message is a list of slots (one iovec each), not a copy either.
# Slots are large enough for a 64 KiB packet, so a TSO/USO super-packet
# (TUN offloads on, see segment.pxd) is read like any other. It is decided
# once with dp_from_tun (one flow lookup, its addresses and ports rewritten
# once), then split: each segment is written into the TUN side's segment
# area (PumpBufs.segs, WG_HDR of room in front, the tag's behind), sealed
# there, and joins the send batch like a packet from a slot; the segments of
# one super-packet are equal-sized but the last, so they go as one UDP GSO
# message (two when there are more than GSO_MAX_SEGS). When the area, the
# iovecs or the messages run out mid-batch, what is batched so far is sent
# and the batch goes on. Writes into the TUN are already joined into
# super-packets when the TUN has IFF_VNET_HDR (coalesce.pxd).
#
# GSO and GRO change nothing on the wire: every datagram is still one
# WireGuard message holding one packet; a peer whose socket has no UDP_GRO gets them one by
# one from its kernel. A kernel that refuses a GSO message (no checksum
# offload on the route's device, or a segment over the path MTU) has its
# packets sent one by one, and GSO stops for that segment size and up.
#
# Queues. With a multi-queue TUN (IFF_MULTI_QUEUE) every queue k has its own
# fd, its own overlay socket (the N sockets share one address and port with
# SO_REUSEPORT) and its own pair of threads, with its own contexts and buffers
# (PumpQueue): everything said above of "the TUN side" and "the UDP side" holds
# per queue, under that queue's tun_lock / udp_lock. How work spreads:
#   - TUN -> UDP: the kernel picks a flow's queue by its flow hash, or, once
#     it has seen the flow's packets written into a queue, that queue (tun.c's
#     flow table); so each flow is read by one thread, in order.
#   - UDP -> TUN: the kernel picks the socket by the datagram's 4-tuple, so all
#     of one peer's datagrams land on one socket and one thread (a peer's
#     packets stay in order; one peer's receive side does not spread). That
#     thread writes each packet into the queue pump_queue_of names by its inner
#     flow, so the kernel learns that queue for the flow, and the flow's answers
#     are read there: the flows of one peer spread over the TUN -> UDP threads.
#     Its coalescing buffer (CoBuf) is flushed when the next packet goes to
#     another queue (co_fd); after a batch it reads, as above, each queue it
#     wrote into, under that queue's tun_lock (trylock).
#   - The spin for an isolated packet's answer polls every queue's socket (the
#     answer lands on the one its peer hashes to), each under its udp_lock
#     (trylock).
# What the threads of different queues share is shared already by the two of
# one queue, and locked where it lives: the tables and flow tables (their
# lock), WireGuard sessions (the tables' lock: a send counter is reserved under
# it, so no nonce is used twice, and replay windows are marked under it), the
# event rings (DpCore.ev_lock, the flow tables' locks). Counters live in each
# queue's contexts and are summed when read. Per-context state that is not
# shared: fragment tracking (all fragments of a datagram have one flow hash, so
# one queue; one peer, one socket), the reject memo (a transit IP may be
# rejected once per UDP thread per REJECT_GAP_MS), the cipher contexts.
#
# The datagrams' header and types are the wire format's (wire.pxd).

from libc.stdint cimport uint8_t, uint64_t
from posix.unistd cimport write

from includes.pthread cimport pthread_mutex_t
from includes.socket cimport iovec, mmsghdr, sockaddr_in6


cdef enum:
    PUMP_BATCH = 64
    PUMP_SLOT = 65536 + 64
    PUMP_IOVS = 512         # datagrams per send batch (slots, and segments in the area)
    PUMP_SEG_AREA = 512 * 1024  # TUN side, with IFF_VNET_HDR: where super-packets are split
    GSO_MAX_SEGS = 64       # UDP_MAX_SEGMENTS of older kernels
    GSO_MAX_BYTES = 65000   # under the largest UDP payload (65507 on IPv4)
    PUMP_CTRL = 4           # 8-byte words of control buffer per message (one int cmsg)
    PUMP_MAX_QUEUES = 16    # TUN queues (pump pairs) at most
    # Isolated packets (see the top): a batch of at most SPIN_PACKETS read after
    # SPIN_QUIET_NS of quiet makes the TUN -> UDP thread poll the overlay socket for
    # the answer for up to SPIN_NS, within a budget of 1/SPIN_SHARE of its time
    # (at most SPIN_BUDGET_CAP_NS saved up).
    SPIN_PACKETS = 2
    SPIN_QUIET_NS = 2000000
    SPIN_NS = 400000
    SPIN_SHARE = 20
    SPIN_BUDGET_CAP_NS = 20000000


cdef struct SockAddr:       # big enough for either family
    sockaddr_in6 sa


cdef struct PumpBufs:
    uint8_t *data           # PUMP_BATCH * PUMP_SLOT bytes
    mmsghdr msgs[<int>PUMP_BATCH]
    iovec iovs[<int>PUMP_IOVS]
    SockAddr addrs[<int>PUMP_BATCH]
    uint64_t ctrl[<int>PUMP_BATCH][<int>PUMP_CTRL]  # cmsg space (UDP_SEGMENT / UDP_GRO)
    size_t gso_max          # largest datagram sent with GSO (0: none); lowered on refusal
    int stop                # set by Datapath.stop() (then stop_fd is written)
    pthread_mutex_t tun_lock  # TUN side's only: held by the thread reading the TUN
    int epfd                # the side's thread waits here (its fd: TUN or overlay socket; stop fd)
    pthread_mutex_t udp_lock  # UDP side's only: held by the thread reading the overlay socket
    int vnet                # the TUN has IFF_VNET_HDR: a virtio-net header on every packet
    CoBuf co                # UDP side's only, with vnet: the super-packet being joined
    int co_fd               # ... and the TUN queue fd it goes to
    uint8_t *segs           # TUN side's only, with vnet: PUMP_SEG_AREA bytes for segments


cdef struct TxRun:          # the send batch _tun_batch is building
    unsigned int nmsg       # messages (b.msgs) so far
    unsigned int npkt       # datagrams (b.iovs) so far
    unsigned int nseg       # datagrams in the last message
    size_t seg              # the last message's datagram size
    size_t total            # ... and its bytes
    Py_ssize_t area         # bytes of b.segs in use
    uint32_t peer           # the last message's peer
    bint grow               # whether the last message may take the next datagram


cdef struct PumpQueue:      # one queue's pair: TUN side (tc, tb) and UDP side (uc, ub)
    DpCtx *tc
    PumpBufs *tb
    DpCtx *uc
    PumpBufs *ub
    int tun_fd
    int udp_fd


cdef struct PumpSet:        # every queue, and what all the threads share
    DpCore *d
    PumpQueue q[<int>PUMP_MAX_QUEUES]
    int n
    int sock_family
    int stop_fd
    int event_fd


cdef inline void pump_wake(int efd) noexcept nogil:
    """Make an eventfd readable."""
    cdef uint64_t one = 1
    write(efd, &one, 8)


cdef int pump_tun_init(PumpBufs *b, int tun_fd, int stop_fd) noexcept nogil
cdef void pump_tun_free(PumpBufs *b) noexcept nogil
cdef int pump_udp_init(PumpBufs *b, int udp_fd, int stop_fd) noexcept nogil
cdef void pump_udp_free(PumpBufs *b) noexcept nogil
cdef int pump_enable_gro(int udp_fd) noexcept nogil
cdef int pump_queue_of(const uint8_t *p, Py_ssize_t n, int nq) noexcept nogil
cdef void pump_tun_to_udp(PumpSet *s, int k) noexcept nogil
cdef void pump_udp_to_tun(PumpSet *s, int k) noexcept nogil
