"""What the datapath's software GRO writes into a TUN, caught on a socket pair."""

from __future__ import annotations

import socket

from conn25._fastpath import _test_coalesce


def coalesced_writes(packets: list[bytes]) -> list[bytes]:
    """The messages (virtio-net header + packet) the coalescing writes for ``packets``."""
    rd, wr = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        for s in (rd, wr):  # room for every write: nothing may be lost here
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        _test_coalesce(packets, wr.fileno())
        rd.setblocking(False)
        out = []
        while True:
            try:
                out.append(rd.recv(1 << 17))
            except BlockingIOError:
                return out
    finally:
        rd.close()
        wr.close()
