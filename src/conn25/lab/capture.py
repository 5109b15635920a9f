"""What crosses one link of the testbed, captured with an AF_PACKET socket (no tcpdump):
every frame, both directions, from start() to stop(), bounded in bytes and time.

The frames are only parsed as far as the tests look (Ethernet, IPv4/IPv6 without extension
headers, UDP). A capture that lost frames says so (`dropped`): a test that asserts something
is absent must not trust a capture with holes.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .netns import Netns

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_OUTGOING = 4
MAX_FRAME = 1 << 18  # a GSO/GRO frame on a veth can be far larger than the MTU
RCVBUF = 16 << 20
SO_RCVBUFFORCE = 33  # (Linux; not in the socket module) root may exceed rmem_max


@dataclass(frozen=True)
class Frame:
    data: bytes
    outgoing: bool  # sent by this side of the link


@dataclass(frozen=True)
class Udp:
    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes
    outgoing: bool


class Capture:
    """Frames on `ifname` in namespace `ns`, at most `max_bytes` of them."""

    def __init__(self, ns: Netns, ifname: str, max_bytes: int = 32 << 20) -> None:
        self.where = f"{ifname} in {ns.name}"
        self.max_bytes = max_bytes
        self.frames: list[Frame] = []
        self.bytes = 0
        self.full = False
        self.dropped = 0

        def make() -> socket.socket:
            # Protocol 0 first, so nothing is queued until the socket is bound to the one
            # link; binding with ETH_P_ALL then takes that link's frames only.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                s.bind((ifname, ETH_P_ALL))
            except BaseException:
                s.close()
                raise
            return s

        self._sock = ns.call(make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"capture {self.where}",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Capture({self.where}: {len(self.frames)} frames)"

    def _read(self) -> None:
        self._sock.settimeout(0.05)  # how soon stop() is noticed
        buf = bytearray(MAX_FRAME)
        while not self._stop.is_set():
            try:
                n, addr = self._sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                break
            if self.bytes + n > self.max_bytes:
                self.full = True
                break
            self.bytes += n
            self.frames.append(Frame(bytes(buf[:n]), addr[2] == PACKET_OUTGOING))

    def stop(self, timeout: float = 5) -> Capture:
        """Stop capturing (the frames stay); AssertionError if the reader does not end."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the capture on {self.where} did not stop")
        # tp_packets, tp_drops: frames the kernel could not queue for this socket.
        _, self.dropped = struct.unpack(
            "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self._sock.close()
        return self

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()

    def complete(self) -> bool:
        """Nothing was lost: no frame dropped, the byte bound not reached."""
        return not self.dropped and not self.full

    def find(self, needles: set[bytes] | frozenset[bytes]) -> list[Frame]:
        """The frames holding any of `needles`."""
        return [f for f in self.frames if any(n in f.data for n in needles)]

    def udp(self) -> Iterator[Udp]:
        for f in self.frames:
            u = parse_udp(f.data, f.outgoing)
            if u is not None:
                yield u


def parse_udp(frame: bytes, outgoing: bool = False) -> Udp | None:
    """The UDP datagram in an Ethernet frame (IPv4 or IPv6 without extension headers), or
    None. Its payload runs to the end of the IP packet: one GSO super-frame is one datagram
    here, holding several of the sender's datagrams back to back."""
    if len(frame) < 14:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
        hlen = (ip[0] & 0x0F) * 4
        end = int.from_bytes(ip[2:4], "big") or len(ip)  # 0: a GSO frame's, not set
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), \
            socket.inet_ntop(socket.AF_INET, ip[16:20])
    elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 17:
        hlen = 40
        end = 40 + int.from_bytes(ip[4:6], "big") if ip[4:6] != b"\0\0" else len(ip)
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), \
            socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        return None
    udp = ip[hlen:min(end, len(ip))]
    if len(udp) < 8:
        return None
    sport, dport = struct.unpack("!HH", udp[:4])
    return Udp((src, sport), (dst, dport), udp[8:], outgoing)
