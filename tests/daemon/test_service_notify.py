"""`conn25d up` under a service manager, as systemd runs it (Type=notify): the real
node in a network namespace (conn25.lab.testbed) talks to a unix datagram socket this
test binds and names in $NOTIFY_SOCKET, and logs to a file it names in $JOURNAL_STREAM.

The socket receives the senders' credentials, as systemd's does: every message must
come from the main process (the unit's NotifyAccess=main).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from conn25.lab.testbed import DEFAULT_NODES, Testbed

pytestmark = pytest.mark.root

SPEC = {n.name: n for n in DEFAULT_NODES}
CLIENT = SPEC["client"]
DNS = "100.100.100.100"
PEERAPI_PORT = 41642


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    # The client has an app, so it serves DNS; its connector need not run for that.
    with Testbed.serving(tmp_path_factory.mktemp("svc"), (),
                         nodes=(CLIENT, SPEC["conn1"])) as tb:
        yield tb


class Manager:
    """The service manager's end: a bound datagram socket that reads who sent what."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        """The next message's sender PID and lines; None after `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = next(struct.unpack("iII", cdata)[0] for level, kind, cdata in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return pid, data.decode().split("\n")

    def wait(self, pid: int, key: str, timeout: float, skip: tuple[str, ...] = ()) -> list[str]:
        """The next message, which must hold `key`=... and come from `pid`; messages of
        only `skip` lines are passed over."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is None:
                break
            sender, lines = got
            assert sender == pid, f"{lines} came from PID {sender}, not the main process {pid}"
            if all(line in skip for line in lines):
                continue
            assert any(line.startswith(key + "=") for line in lines), lines
            return lines
        raise AssertionError(f"no {key}= within {timeout}s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path):
    m = Manager(tmp_path / "notify")
    yield m
    m.close()


def start(bed: Testbed, manager: Manager, **env: str):
    log = bed.workdir / "client.log"
    log.write_bytes(b"")  # the file the node's stderr goes to, so its inode is known now
    st = os.stat(log)
    proc = bed.start("client", wait=False, env={
        "NOTIFY_SOCKET": str(manager.path), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", **env})
    return proc


def stop(bed: Testbed) -> int:
    return bed.stop("client")


def dns_answers(bed: Testbed) -> int:
    """One query to the node's DNS server, sent once (no retry); its rcode."""
    def ask() -> int:
        q = DNSRecord.question("direct.example.net", "A")
        return DNSRecord.parse(q.send(DNS, 53, timeout=5)).header.rcode
    return bed.ns["client"].call(ask)


def peerapi_listens(bed: Testbed) -> bool:
    def connect() -> bool:
        with socket.create_connection((CLIENT.overlay4, PEERAPI_PORT), timeout=5):
            return True
    return bed.ns["client"].call(connect)


def test_ready_is_sent_once_the_node_serves_and_only_then(bed, manager):
    proc = start(bed, manager)
    try:
        lines = manager.wait(proc.pid, "READY", 20)
        # At once, each asked one time: a READY=1 sent early finds one of them not there.
        assert dns_answers(bed) == RCODE.NOERROR
        assert peerapi_listens(bed)
        assert bed.status("client") is not None
        assert "READY=1" in lines
        status = next(line for line in lines if line.startswith("STATUS="))
        assert status.startswith("STATUS=serving client on conn25: peers 1, apps 1"), status
    finally:
        assert stop(bed) == 0


def test_watchdog_is_pinged_at_half_its_timeout_while_the_node_runs(bed, manager):
    proc = start(bed, manager, WATCHDOG_USEC="400000")  # a ping at least every 0.2 s
    try:
        manager.wait(proc.pid, "READY", 20)
        pings = [manager.wait(proc.pid, "WATCHDOG", 2) for _ in range(5)]
        assert all(p == ["WATCHDOG=1"] for p in pings)
    finally:
        assert stop(bed) == 0


def test_no_watchdog_pings_for_another_process(bed, manager):
    proc = start(bed, manager, WATCHDOG_USEC="400000", WATCHDOG_PID="1")
    try:
        manager.wait(proc.pid, "READY", 20)
        assert manager.receive(1.0) is None
    finally:
        assert stop(bed) == 0


def test_sighup_is_announced_as_a_reload_and_ready_again_after_it(bed, manager):
    proc = start(bed, manager, WATCHDOG_USEC="2000000")
    try:
        manager.wait(proc.pid, "READY", 20)
        proc.send_signal(signal.SIGHUP)
        reloading = manager.wait(proc.pid, "RELOADING", 10, skip=("WATCHDOG=1",))
        assert reloading[0] == "RELOADING=1"
        assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1]), reloading
        ready = manager.wait(proc.pid, "READY", 10, skip=("WATCHDOG=1",))
        # Sent once the reload was applied: the status counts it.
        assert any(line.endswith("reloads 1, rejected reloads 0") for line in ready), ready
        assert "tailnet file" in bed.log("client") and "reloaded" in bed.log("client")
    finally:
        assert stop(bed) == 0


def test_sigterm_sends_stopping_then_the_node_exits_0(bed, manager):
    proc = start(bed, manager)
    manager.wait(proc.pid, "READY", 20)
    proc.send_signal(signal.SIGTERM)
    assert manager.wait(proc.pid, "STOPPING", 10) == ["STOPPING=1"]
    assert proc.wait(timeout=20) == 0  # by itself: stop() would signal it again
    assert stop(bed) == 0


def test_log_lines_into_the_journal_carry_a_priority_and_no_timestamp(bed, manager):
    proc = start(bed, manager)
    manager.wait(proc.pid, "READY", 20)
    assert stop(bed) == 0
    lines = bed.log("client").splitlines()
    assert any(re.fullmatch(r"<6>conn25d INFO node client up: tun=conn25 .*", x) for x in lines)
    assert any(x.startswith("<7>") for x in lines)  # the testbed runs nodes with debug
    assert [x for x in lines if not re.match(r"<[0-7]>", x)] == []
