"""Turning on TUN offloads (conn25.daemon.tun.set_offload) against the real kernel,
in a namespace this module creates: the best mode the kernel accepts is taken, a
mode with a flag the kernel does not know falls back to the next one, and when it
accepts none the TUN stays without offloads ("off").

This kernel accepts every flag conn25d asks for, so the fallback is driven with a
flag no kernel defines (bit 30 of TUNSETOFFLOAD), which the kernel refuses with
EINVAL just as an older kernel refuses USO.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from conn25.daemon.tun import OFFLOAD_MODES, OFFLOAD_OFF, TUN_F_CSUM, open_tun, set_offload
from conn25.lab.netns import Netns

pytestmark = pytest.mark.root

UNKNOWN_FLAG = 1 << 30  # no TUN_F_* has this bit (6.17 took 0x80 and 0x100)


@pytest.fixture
def tun_fd() -> Iterator[int]:
    ns = Netns("tunoff")
    fd = -1
    try:
        fd = ns.call(lambda: open_tun("offl", vnet_hdr=True)[0])
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        ns.close()


def test_the_best_mode_the_kernel_accepts_is_taken(tun_fd: int) -> None:
    assert set_offload(tun_fd) == OFFLOAD_MODES[0][0]


def test_a_mode_the_kernel_refuses_falls_back_to_the_next(tun_fd: int) -> None:
    modes = (("unknown", OFFLOAD_MODES[0][1] | UNKNOWN_FLAG), ("csum", TUN_F_CSUM))
    assert set_offload(tun_fd, modes) == "csum"


def test_none_accepted_leaves_the_tun_without_offloads(tun_fd: int) -> None:
    assert set_offload(tun_fd, (("unknown", UNKNOWN_FLAG),)) == OFFLOAD_OFF


def test_an_fd_that_is_no_tun_is_an_error_that_says_so() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="TUNSETOFFLOAD"):
            set_offload(r)
    finally:
        os.close(r)
        os.close(w)
