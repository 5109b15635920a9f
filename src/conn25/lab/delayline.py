"""A delay line: a fixed one-way delay on the link between two namespaces, for a WAN
in the tests and benchmarks on a kernel without netem.

    a ns  ==veth==  wan ns: wa ─ bridge ba ─ TAP ta ⇄ delay process ⇄ TAP tb ─ bridge bb ─ wb
                                                                                ==veth==  b ns

The link is a layer-2 bump in the wire: a and b keep their addresses on one subnet and
see each other as neighbours (ARP included), and whatever one sends the other gets
`one_way` seconds later, in the order sent, both ways (round trip: twice that). The
process (`python -m conn25.lab.delayline`, stdlib only) owns the two TAP devices: every
frame it reads from one it writes into the other once its time has come. TAPs without
offloads get whole, checksummed frames of at most the MTU, so nothing needs fixing on
the way. A direction's queue is bounded (packets and bytes); what does not fit is
dropped and counted, as a router's full buffer would.

The process stops by itself when its stdin closes (close(), or its parent gone), and
then prints its counters; the TAP devices go with it, the namespace with close().
Only documentation addresses (the caller's); the wan namespace has none of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from .netns import Netns, sh, terminate

TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
MAX_PACKETS, MAX_BYTES = 10_000, 16 << 20  # per direction
READ_BATCH = 256  # frames read from one TAP before the due ones are written
TAPS = ("ta", "tb")


@dataclasses.dataclass(frozen=True)
class Counters:
    """What the delay process did, per direction (a->b, b->a)."""

    forwarded: tuple[int, int]
    dropped: tuple[int, int]  # the queue was full
    write_errors: tuple[int, int]
    late_max_ms: float  # how much later than due the latest frame was written
    late_mean_ms: float
    late_over_1ms: int  # frames written more than 1 ms after they were due
    queue_max: int  # the most frames one direction held at once


# -- the process ----------------------------------------------------------------------

def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def serve(names: tuple[str, str], one_way: float, max_packets: int, max_bytes: int,
          control: int = 0) -> Counters:
    """Forward between the TAPs `names` with delay `one_way` (s) until `control` (a file
    descriptor) reaches end of file."""
    fds = [open_tap(n) for n in names]
    print(json.dumps({"ready": list(names)}), flush=True)
    queues: tuple[deque[tuple[float, bytes]], deque[tuple[float, bytes]]] = (deque(), deque())
    queued_bytes = [0, 0]
    forwarded, dropped, errors = [0, 0], [0, 0], [0, 0]
    late_max = late_sum = 0.0
    late_over = queue_max = 0
    # A signal (SIGTERM, SIGINT: SystemExit, KeyboardInterrupt) stops it as EOF does.
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        while True:
            heads = [q[0][0] for q in queues if q]
            timeout = max(0.0, min(heads) - time.monotonic()) if heads else None
            readable, _, _ = select.select([*fds, control], [], [], timeout)
            if control in readable and not os.read(control, 4096):
                break
            for side, fd in enumerate(fds):
                if fd not in readable:
                    continue
                q = queues[side]
                for _ in range(READ_BATCH):
                    try:
                        frame = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if len(q) >= max_packets or queued_bytes[side] + len(frame) > max_bytes:
                        dropped[side] += 1
                        continue
                    # Due `one_way` after it was read: never early, and in order, since the
                    # delay is the same for every frame.
                    q.append((time.monotonic() + one_way, frame))
                    queued_bytes[side] += len(frame)
                queue_max = max(queue_max, len(q))
            now = time.monotonic()
            for side, q in enumerate(queues):
                while q and q[0][0] <= now:
                    due, frame = q.popleft()
                    queued_bytes[side] -= len(frame)
                    try:
                        os.write(fds[1 - side], frame)
                    except OSError:  # the other TAP not up (yet): lost, as on a cable
                        errors[side] += 1
                        continue
                    forwarded[side] += 1
                    late_max = max(late_max, now - due)
                    late_sum += now - due
                    late_over += now - due > 0.001
    total = sum(forwarded)
    return Counters((forwarded[0], forwarded[1]), (dropped[0], dropped[1]),
                    (errors[0], errors[1]), late_max * 1000,
                    late_sum / total * 1000 if total else 0.0, late_over, queue_max)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Forward frames between two TAP devices "
                                 "after a fixed delay, until stdin closes.")
    ap.add_argument("--one-way-ms", type=float, required=True)
    ap.add_argument("--max-packets", type=int, default=MAX_PACKETS)
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    ap.add_argument("--realtime", action="store_true",
                    help="run at the lowest real-time priority (SCHED_FIFO 1)")
    ap.add_argument("taps", nargs=2)
    args = ap.parse_args(argv)
    if args.realtime:
        # Woken ahead of every ordinary task, so a busy machine does not make frames late;
        # it sleeps between frames, and the kernel's real-time throttle bounds it anyway.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except OSError as e:
            print(f"delayline: no real-time priority ({e}); frames may be late", file=sys.stderr)

    # SIGTERM unwinds serve() as SIGINT does, so the counters are printed either way.
    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    counters = serve(tuple(args.taps), args.one_way_ms / 1000, args.max_packets,
                     args.max_bytes)
    print(json.dumps(dataclasses.asdict(counters)), flush=True)
    return 0


# -- the namespace around it ------------------------------------------------------------

class DelayLine:
    """A veth link between `a` and `b` (interface `a_if` with `a_addr`, a prefix given,
    and `b_if` with `b_addr`) through a wan namespace that delays it by `rtt_ms` / 2 each
    way (`realtime`: the process at a real-time priority, for a busy machine). close()
    removes it (and the interfaces in a and b), also after a failure."""

    def __init__(self, a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str,
                 rtt_ms: float, *, max_packets: int = MAX_PACKETS,
                 max_bytes: int = MAX_BYTES, realtime: bool = False) -> None:
        self.rtt_ms = rtt_ms
        self.counters: Counters | None = None
        self.proc: subprocess.Popen | None = None
        self.ns = Netns("wan")
        try:
            self._build(a, a_if, a_addr, b, b_if, b_addr, max_packets, max_bytes, realtime)
        except BaseException:
            self.close()
            raise

    def _build(self, a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str,
               max_packets: int, max_bytes: int, realtime: bool) -> None:
        wan = self.ns
        # The bridges and TAPs would send router solicitations and MLD reports of their own.
        for scope in ("all", "default"):
            wan.run("sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")
        # Run from this file's tree, whichever conn25 the interpreter has installed.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = wan.popen(sys.executable, "-m", "conn25.lab.delayline",
                              "--one-way-ms", str(self.rtt_ms / 2),
                              "--max-packets", str(max_packets), "--max-bytes", str(max_bytes),
                              *(["--realtime"] if realtime else []), *TAPS,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
        self._ready(10)
        for ns, ifname, addr, side in ((a, a_if, a_addr, "a"), (b, b_if, b_addr, "b")):
            sh("ip", "link", "add", ifname, "netns", ns.name, "type", "veth", "peer", "name",
               f"w{side}", "netns", wan.name)
            # STP off (the default): the ports forward at once. No multicast snooping: it
            # would have the bridge send IGMP reports of its own down the line.
            wan.run("ip", "link", "add", f"b{side}", "type", "bridge", "mcast_snooping", "0")
            for port in (f"w{side}", f"t{side}"):
                wan.run("ip", "link", "set", port, "master", f"b{side}")
                wan.run("ip", "link", "set", port, "up")
            wan.run("ip", "link", "set", f"b{side}", "up")
            ns.run("ip", "addr", "add", addr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")

    def _ready(self, timeout: float) -> None:
        """Wait for the process's line saying its TAPs exist."""
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b'{"ready"'):
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            raise RuntimeError(f"the delay process did not start: {line!r} "
                               f"{err.decode(errors='replace')[-2000:]}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def close(self) -> Counters | None:
        """Stop the process (its stdin closed; by signal if it does not go) and remove the
        namespace; the process's counters, or None if it printed none."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:  # closes its stdin, its sign to stop
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                terminate(proc)
                out, _ = proc.communicate(timeout=5)
            lines = out.decode(errors="replace").strip().splitlines()
            with contextlib.suppress(ValueError, TypeError, IndexError, KeyError):
                doc = json.loads(lines[-1])
                pair = {k: (int(doc[k][0]), int(doc[k][1]))
                        for k in ("forwarded", "dropped", "write_errors")}
                self.counters = Counters(**pair, late_max_ms=float(doc["late_max_ms"]),
                                         late_mean_ms=float(doc["late_mean_ms"]),
                                         late_over_1ms=int(doc["late_over_1ms"]),
                                         queue_max=int(doc["queue_max"]))
        self.ns.close()
        return self.counters

    def __enter__(self) -> DelayLine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
