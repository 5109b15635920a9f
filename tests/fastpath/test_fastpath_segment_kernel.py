"""The split of super-packets (segment.pxd) against the kernel itself: a super-packet
written into one TUN device (virtio-net header, GSO) is forwarded by the kernel of a
namespace this test creates out of a second TUN that offers no offloads, so the kernel
segments it in software (tcp_gso_segment / __udp_gso_segment); what the second TUN
reads must be, byte for byte, what the datapath makes of the same super-packet (with
the TTL / hop limit one lower, as forwarding leaves it).
"""

from __future__ import annotations

import os
import select
import struct
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from conn25._fastpath import _test_segment
from conn25.daemon.tun import open_tun
from conn25.lab.netns import Netns

pytestmark = pytest.mark.root

SRC4, DST4 = "100.64.0.1", "198.51.100.10"
SRC6, DST6 = "fd7a:115c:a1e0::1", "2001:db8::10"
NEEDS_CSUM, TCPV4, TCPV6, UDP_L4 = 1, 1, 4, 5


@pytest.fixture(scope="module")
def kernel():
    """(fd of TUN "gsoin" with virtio-net headers, fd of TUN "gsoout" without) in a
    namespace that forwards from one to the other."""
    ns = Netns("gso")
    fds: list[int] = []
    try:
        fds.append(ns.call(lambda: open_tun("gsoin", vnet_hdr=True)[0]))
        fds.append(ns.call(lambda: open_tun("gsoout")[0]))
        for name in ("gsoin", "gsoout"):
            ns.run("ip", "link", "set", name, "addrgenmode", "none")
            ns.run("ip", "link", "set", name, "mtu", "1500", "up")
        for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                       "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.gsoin.rp_filter=0"):
            ns.run("sysctl", "-qw", sysctl)
        ns.run("ip", "route", "add", "100.64.0.0/24", "dev", "gsoin")
        ns.run("ip", "route", "add", "198.51.100.0/24", "dev", "gsoout")
        ns.run("ip", "-6", "route", "add", "fd7a:115c:a1e0::/64", "dev", "gsoin")
        ns.run("ip", "-6", "route", "add", "2001:db8::/64", "dev", "gsoout")
        for fd in fds:
            os.set_blocking(fd, False)
        yield fds[0], fds[1]
    finally:
        for fd in fds:
            os.close(fd)
        ns.close()


def kernel_split(kernel, hdr: bytes, packet: bytes, count: int) -> list[bytes]:
    """What the kernel forwards out of "gsoout" for `packet` written into "gsoin"."""
    tun_in, tun_out = kernel
    while select.select([tun_out], [], [], 0)[0]:
        os.read(tun_out, 70000)  # nothing of an earlier case
    os.write(tun_in, hdr + packet)
    out: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(out) < count and time.monotonic() < deadline:
        if select.select([tun_out], [], [], max(deadline - time.monotonic(), 0))[0]:
            out.append(os.read(tun_out, 70000))
    return out


def partial(full: bytes, l4_check_at: int) -> bytes:
    """`full` with the L4 checksum field holding the pseudo-header sum (NEEDS_CSUM)."""
    if full[0] >> 4 == 4:
        ihl = (full[0] & 15) * 4
        words = full[12:20] + struct.pack("!HH", full[9], len(full) - ihl)
    else:
        ihl = 40
        words = full[8:40] + struct.pack("!HH", full[6], len(full) - 40)
    s = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    at = ihl + l4_check_at
    return full[:at] + struct.pack("!H", s) + full[at + 2:]


def forwarded(packet: bytes) -> bytes:
    """`packet` as forwarding leaves it: TTL / hop limit one lower (the split recomputes
    the IPv4 header checksum)."""
    buf = bytearray(packet)
    buf[8 if buf[0] >> 4 == 4 else 7] -= 1
    return bytes(buf)


def tcp_case(v6: bool, flags: str, size: int) -> bytes:
    payload = bytes((i * 13) % 256 for i in range(size))
    l3 = (IPv6(src=SRC6, dst=DST6, hlim=64, fl=0xBEEF) if v6 else
          IP(src=SRC4, dst=DST4, ttl=64, id=0xFFFE, flags="DF"))
    full = bytes(l3 / TCP(sport=40000, dport=443, seq=2**32 - 2000, ack=5, flags=flags,
                          window=300, options=[("NOP", None), ("NOP", None),
                                               ("Timestamp", (1, 2))]) / payload)
    return partial(full, 16)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("flags", ["A", "FPA", "CPA"])
def test_tcp_segments_are_the_kernels(kernel, v6, flags):
    mss, size = 1000, 4 * 1000 + 333
    packet = tcp_case(v6, flags, size)
    l3 = 40 if v6 else 20
    hdr = struct.pack("<BBHHHH", NEEDS_CSUM, TCPV6 if v6 else TCPV4, l3 + 32, mss, l3, 16)
    ours = _test_segment(hdr, forwarded(packet))
    assert len(ours) == 5
    assert kernel_split(kernel, hdr, packet, len(ours)) == ours


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_udp_datagrams_are_the_kernels(kernel, v6):
    size, total = 1200, 3 * 1200 + 77
    payload = bytes((i * 7) % 256 for i in range(total))
    l3 = (IPv6(src=SRC6, dst=DST6, hlim=64) if v6 else IP(src=SRC4, dst=DST4, ttl=64, id=9))
    packet = partial(bytes(l3 / UDP(sport=5000, dport=4433) / payload), 6)
    hdr = struct.pack("<BBHHHH", NEEDS_CSUM, UDP_L4, (40 if v6 else 20) + 8, size,
                      40 if v6 else 20, 6)
    ours = _test_segment(hdr, forwarded(packet))
    assert len(ours) == 4
    assert kernel_split(kernel, hdr, packet, len(ours)) == ours
