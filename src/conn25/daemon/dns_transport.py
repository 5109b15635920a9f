"""What the DNS server and the forwarder share: DNS over TCP framing, sending a
datagram, the socket family of an address, and how an address is shown in a log line.

May touch: trio streams (reading whole messages). Decides nothing about DNS
content: that is :mod:`conn25.core.dnsquery`'s.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

from ..core.dnsquery import MAX_MESSAGE

__all__ = ["DNS_PORT", "Framer", "Upstream", "family", "send_datagram", "show"]

DNS_PORT = 53

Upstream = tuple[str, int]


class Framer:
    """DNS over TCP: messages with a 2-byte length prefix (RFC 1035 §4.2.2).

    Bytes already read survive a cancelled :meth:`receive`, so a caller may
    wrap it in a timeout and call again.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def receive(self) -> bytes | None:
        """The next message; None at end of stream (a half-sent message is dropped)."""
        while True:
            if len(self._buf) >= 2:
                size = int.from_bytes(self._buf[:2], "big")
                if len(self._buf) >= 2 + size:
                    msg = bytes(self._buf[2 : 2 + size])
                    del self._buf[: 2 + size]
                    return msg
            data = await self.stream.receive_some(MAX_MESSAGE + 2)
            if not data:
                return None
            self._buf += data

    @staticmethod
    def frame(msg: bytes) -> bytes:
        return len(msg).to_bytes(2, "big") + msg


async def send_datagram(raw: socket.socket, sock: trio.socket.SocketType, data: bytes,
                        to: Any = None) -> None:
    """Send ``data`` on the UDP socket ``sock`` (to ``to``, or its connected peer): at once
    through ``raw``, its non-blocking stdlib socket, while the buffer has room (trio's send
    costs a context manager before the datagram leaves and a scheduler pass after it);
    through trio when the buffer is full."""
    try:
        if to is None:
            raw.send(data)
        else:
            raw.sendto(data, to)
    except BlockingIOError:
        if to is None:
            await sock.send(data)
        else:
            await sock.sendto(data, to)


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def show(upstream: Upstream) -> str:
    host, port = upstream
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

