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
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tun(name: str, vnet_hdr: bool = False) -> tuple[int, str]:
    """Create (or attach to) TUN device ``name``; returns (fd, actual name).

    Raw IP packets, no packet-information header; with ``vnet_hdr`` each behind
    a 10-byte virtio-net header (IFF_VNET_HDR; no offloads until set_offload),
    which lets the datapath write GSO super-packets. The device disappears when the
    last fd on it is closed (unless made persistent elsewhere).
    """
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or " " in name:
        raise ValueError(f"bad interface name {name!r} (1-15 characters, no '/' or spaces)")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack("16sH22x", name.encode(), flags)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot create TUN device {name!r}: {e.strerror}") from None
    actual = res[:16].rstrip(b"\0").decode()
    return fd, actual


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
