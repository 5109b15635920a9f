"""conn25.lab.wggo: a wireguard-go device comes up even when its control socket is slow to
listen. `wg` unlinks a socket that refuses a connection, as one does between bind and
listen, and wireguard-go then exits ("Failed to listen on uapi socket"); asking `wg` too
early lost a CI run that way. strace delays wireguard-go's listen() to hold that window
open for as long as a busy machine once did."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conn25.core.wireguard import keys
from conn25.lab.netns import Netns
from conn25.lab.wggo import WireguardGo, wireguard_missing

pytestmark = pytest.mark.root


@pytest.fixture
def ns() -> Iterator[Netns]:
    n = Netns("wgslow")
    try:
        yield n
    finally:
        n.close()


def test_a_device_whose_listen_is_slow_still_comes_up(
        ns: Netns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if (why := wireguard_missing()) is not None:
        pytest.fail(why)
    if shutil.which("strace") is None:
        pytest.fail("strace not on PATH: `install.sh --dev` installs it")
    real = shutil.which("wireguard-go")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "wireguard-go"
    wrapper.write_text("#!/bin/sh\nexec strace -I1 -f --seccomp-bpf -o /dev/null -e trace=listen "
                       f"-e inject=listen:delay_enter=300000 {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    wg = WireguardGo(ns, tmp_path / "wireguard-go.log", tmp_path / "wg.key",
                     keys.generate_private())
    try:
        wg.set("listen-port", "51820")
        assert wg.show("listen-port") == [["51820"]]
        assert wg.proc.poll() is None
    finally:
        wg.close()
