"""Opening a TUN device (the only system call the datapath needs beyond sockets).

Addresses, routes and link state are set with pyroute2 by the node's system
set-up; this module only creates the device and hands back its fd.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# What set_offload asks for, best first: (mode as status shows it, flags).
OFFLOAD_MODES = (
    ("tso+uso", TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6),
    ("tso", TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
)
OFFLOAD_OFF = "off"
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
MAX_QUEUES = 16  # TUN queues (pump pairs) the datapath runs at most


def open_tun(name: str, vnet_hdr: bool = False) -> tuple[int, str]:
    """Create (or attach to) single-queue TUN device ``name``; returns (fd, actual
    name). As open_tun_queues with one queue."""
    fds, actual = open_tun_queues(name, 1, vnet_hdr=vnet_hdr)
    return fds[0], actual


def open_tun_queues(name: str, queues: int, *, vnet_hdr: bool = False) -> tuple[list[int], str]:
    """Create (or attach to) TUN device ``name``; returns (fds, actual name), one fd
    per queue.

    Raw IP packets, no packet-information header; with ``vnet_hdr`` each behind
    a 10-byte virtio-net header (IFF_VNET_HDR; no offloads until set_offload),
    which lets the datapath write GSO super-packets. With ``queues`` > 1 the
    device is multi-queue (IFF_MULTI_QUEUE): each fd is one queue, and the
    kernel spreads the packets it sends into the TUN over them by flow. The
    device disappears when the last fd on it is closed (unless made persistent
    elsewhere).
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"bad interface name {name!r} (1-15 characters, no '/' or spaces)")
    check_queues(queues)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0) \
        | (IFF_MULTI_QUEUE if queues > 1 else 0)
    fds: list[int] = []
    actual = name
    queue = 0
    try:
        for queue in range(queues):  # noqa: B007 (the error names the queue that failed)
            fds.append(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC))
            # Every queue attaches by the name the first one got.
            res = fcntl.ioctl(fds[-1], TUNSETIFF,
                              struct.pack("16sH22x", actual.encode(), flags))
            actual = res[:16].rstrip(b"\0").decode()
    except OSError as e:
        for fd in fds:
            os.close(fd)
        what = f"queue {queue} of " if queues > 1 else ""
        raise OSError(e.errno, f"cannot create {what}TUN device {name!r}: {e.strerror}") \
            from None
    return fds, actual


def check_queues(queues: object) -> int:
    """``queues`` if it is a valid number of TUN queues, else ValueError."""
    if not isinstance(queues, int) or isinstance(queues, bool) \
            or not 1 <= queues <= MAX_QUEUES:
        raise ValueError(f"bad number of TUN queues {queues!r} (1-{MAX_QUEUES})")
    return queues


def set_offload(fd: int, modes: tuple[tuple[str, int], ...] = OFFLOAD_MODES) -> str:
    """Let the kernel hand the TUN (opened with ``vnet_hdr``) TSO super-packets and
    partial checksums, and USO ones where it has them (Linux 6.2+): the best mode of
    ``modes`` the kernel accepts, or "off" (none asked for) when it accepts none.
    The datapath splits what it reads (segment.pxd)."""
    for mode, flags in modes:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return mode
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a flag this kernel does not know
                raise OSError(e.errno, f"TUNSETOFFLOAD: {e.strerror}") from None
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return OFFLOAD_OFF
