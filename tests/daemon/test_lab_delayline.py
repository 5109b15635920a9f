"""conn25.lab.delayline: two namespaces joined through it see the round trip it was
given (never less, a little more), a full queue drops and counts, and nothing is left
behind, whether it is closed or its parent dies."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from conn25.lab.delayline import DelayLine
from conn25.lab.netns import Netns, sh, wait_for

pytestmark = pytest.mark.root

A4, B4 = "192.0.2.1", "192.0.2.2"


@pytest.fixture
def ends() -> Iterator[tuple[Netns, Netns]]:
    a, b = Netns("a"), Netns("b")
    try:
        # No IPv6 chatter of their own (router solicitations, MLD) in the queues counted.
        for ns in (a, b):
            for scope in ("all", "default"):
                ns.run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def line(ends: tuple[Netns, Netns]) -> Iterator[Callable[..., DelayLine]]:
    """Makes a delay line between the ends (rtt_ms, DelayLine's keywords), warm; what
    it made is closed after the test, also when the test failed before its own close()."""
    a, b = ends
    made: list[DelayLine] = []

    def make(rtt_ms: float, **kw: int) -> DelayLine:
        d = DelayLine(a, "up0", f"{A4}/24", b, "dn0", f"{B4}/24", rtt_ms, **kw)
        made.append(d)
        # The first ping also waits for ARP through the line; after it, the path is warm.
        wait_for(lambda: a.run("ping", "-n", "-c", "1", "-W", "1", B4,
                               check=False).returncode == 0,
                 10, "a first ping through the delay line")
        return d

    try:
        yield make
    finally:
        for d in made:  # close() again is harmless
            d.close()


def rtts(a: Netns, *args: str) -> list[float]:
    r = a.run("ping", "-n", *args, B4, check=False, timeout=30)
    return [float(t) for t in re.findall(r"time=([\d.]+) ms", r.stdout)]


def gone(pid: int) -> bool:
    try:
        # A zombie is gone too: only its parent's wait is missing.
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("rtt_ms", [20, 50])
def test_pings_take_the_round_trip_given_and_close_removes_everything(ends, line, rtt_ms):
    a, b = ends
    d = line(rtt_ms)
    pid, wan = d.pid, d.ns
    assert pid is not None and wan.exists()
    got = rtts(a, "-c", "30", "-i", "0.02", "-W", "1")
    assert len(got) == 30
    # Never early; late by the process's wake-up, a millisecond or so on a busy machine.
    assert min(got) >= rtt_ms, got
    assert statistics.median(got) <= rtt_ms + 3, got
    assert max(got) <= rtt_ms + 15, got
    counters = d.close()
    assert counters is not None, "the process printed no counters: it did not stop cleanly"
    assert counters.dropped == (0, 0)
    assert min(counters.forwarded) >= 31  # the pings and replies, ARP and the warm-up
    assert counters.late_max_ms < 15
    assert not wan.exists()
    assert gone(pid)
    # The veth ends in a and b go with the wan namespace (which the kernel dismantles
    # in the background).
    for ns, ifname in ((a, "up0"), (b, "dn0")):
        wait_for(lambda ns=ns, ifname=ifname: ns.run("ip", "link", "show", ifname,
                                                     check=False).returncode != 0,
                 10, f"{ifname} in {ns} to go")


def test_a_full_queue_drops_and_counts(ends, line):
    a, b = ends
    d = line(40, max_packets=5)
    # No ARP probe may take a place in a queue: each end knows the other for good.
    for ns, ifname, peer, peer_if, addr in ((a, "up0", b, "dn0", B4), (b, "dn0", a, "up0", A4)):
        mac = json.loads(peer.run("ip", "-j", "link", "show", peer_if).stdout)[0]["address"]
        ns.run("ip", "neigh", "replace", addr, "lladdr", mac, "nud", "permanent", "dev", ifname)
    # 20 echo requests at once: 5 fit in the queue a -> b, the rest are dropped (ping
    # goes on sending, one a second, after the burst: those are not counted here).
    r = a.run("ping", "-n", "-c", "20", "-l", "20", "-W", "1", "-w", "2", B4, check=False)
    counters = d.close()
    assert counters is not None
    answered = [int(s) for s in re.findall(r"icmp_seq=(\d+) ", r.stdout)]
    assert [s for s in answered if s <= 20] == [1, 2, 3, 4, 5], r.stdout
    assert counters.dropped == (15, 0), counters
    assert counters.queue_max == 5


CHILD = r"""
import json, sys
from conn25.lab.delayline import DelayLine
from conn25.lab.netns import Netns
a, b = Netns("a"), Netns("b")
d = DelayLine(a, "up0", "192.0.2.1/24", b, "dn0", "192.0.2.2/24", 20)
print(json.dumps({"pid": d.pid, "ns": [a.name, b.name, d.ns.name]}), flush=True)
sys.stdin.read()  # until killed
"""


def test_the_process_stops_when_its_parent_dies():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    names: list[str] = []
    try:
        assert child.stdout is not None
        doc = json.loads(child.stdout.readline())
        names = doc["ns"]
        assert not gone(doc["pid"])
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        wait_for(lambda: gone(doc["pid"]), 10, "the delay process to stop after its parent")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for name in names:  # what the killed child could not remove
            sh("ip", "netns", "delete", name, check=False)
