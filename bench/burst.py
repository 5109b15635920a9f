"""Burst benchmark: 2,000 fresh app names asked at once by one client (a browser starting up).

A conn25.lab.testbed tailnet (a client and a connector running the real `conn25d up`,
dnsmasq in the "internet" namespace answering *.wild.example.com). From the client's
namespace, one UDP socket sends a query for each of N names no one asked before, all
at once, to the client's DNS server (conn25d: each answer needs the connector), and
then the same number of other fresh names to dnsmasq directly (the baseline, in the
same run). A query unanswered after --retry seconds is sent once more, as a stub
resolver would (counted). Target: every name answered, with a magic IP, within 2 s.

    python bench/burst.py [--names 2000] [--retry 1.0] [--json OUT]    (as root)

Bounded: each burst gives up after 10 s; the run takes about half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dnslib import QTYPE, DNSRecord

from conn25.lab.netns import need_root, wait_for
from conn25.lab.testbed import DNS4, Testbed
from control import CLIENT, CONNECTOR, client_and_connector, cpu_seconds

HERE = Path(__file__).resolve()
CLIENT_DNS = "100.100.100.100"
TARGET_S = 2.0
GIVE_UP_S = 10.0


def burst(server: str, names: list[str], retry: float) -> dict[str, Any]:
    """Ask every name at once; (in this process, run inside the client namespace)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.connect((server, 53))
    wires = {}
    for i, name in enumerate(names):
        q = DNSRecord.question(name, "A")
        q.header.id = i % 65536
        wires[i] = bytes(q.pack())
    sent_at: dict[int, float] = {}
    latency: dict[int, float] = {}
    rcodes: dict[int, int] = {}
    magic = 0
    resent = 0
    start = time.monotonic()
    for i, wire in wires.items():
        sock.send(wire)
        sent_at[i] = time.monotonic()
    last = start
    while len(latency) < len(names) and time.monotonic() - start < GIVE_UP_S:
        ready, _, _ = select.select([sock], [], [], 0.05)
        now = time.monotonic()
        if ready:
            data = sock.recv(4096)
            try:
                rec = DNSRecord.parse(data)
            except Exception:
                continue
            i = next((k for k in (rec.header.id, rec.header.id + 65536) if k < len(names)
                      and k not in latency and str(rec.q.qname).rstrip(".") == names[k]), None)
            if i is None:
                continue
            latency[i] = now - start
            rcodes[i] = rec.header.rcode
            magic += any(rr.rtype == QTYPE.A and str(rr.rdata).startswith("100.80.")
                         for rr in rec.rr)
            last = now
            continue
        for i, t in sent_at.items():  # a stub resolver's retry
            if i not in latency and now - t >= retry:
                sock.send(wires[i])
                sent_at[i] = now
                resent += 1
    sock.close()
    lat = sorted(latency.values())
    return {
        "names": len(names), "answered": len(lat),
        "noerror": sum(1 for r in rcodes.values() if r == 0), "magic": magic, "resent": resent,
        "all_s": (last - start) if len(lat) == len(names) else None,
        "p50_ms": statistics.median(lat) * 1000 if lat else None,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
    }


def run_burst(bed: Testbed, server: str, names: list[str], retry: float) -> dict[str, Any]:
    r = bed.run(CLIENT.name, sys.executable, str(HERE), "--_burst", server, str(retry),
                *names)
    if r.returncode != 0:
        raise RuntimeError(f"burst at {server} failed: {r.stderr}")
    return json.loads(r.stdout)


def fmt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.3g}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", type=int, default=2000, help="fresh names at once (default 2000)")
    ap.add_argument("--retry", type=float, default=1.0,
                    help="seconds before an unanswered query is sent again (default 1)")
    ap.add_argument("--json", metavar="OUT", help="also write the figures here")
    ap.add_argument("--log-level", default="info", help="the daemons' --log-level")
    ap.add_argument("--py-spy", metavar="DIR",
                    help="profile both daemons during the conn25d burst (needs py-spy on PATH; "
                    "raw stacks of the GIL holder)")
    ap.add_argument("--_burst", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._burst:
        server, retry, *names = args._burst
        print(json.dumps(burst(server, names, float(retry))))
        return 0
    if (why := need_root()) is not None:
        print(f"bench/burst.py {why}", file=sys.stderr)
        return 2
    tag = f"{os.getpid()}-{int(time.time())}"
    with (tempfile.TemporaryDirectory(prefix="conn25-burst-") as tmp,
          client_and_connector(Path(tmp), args.log_level) as bed):

        def warm() -> bool:
            r = run_burst(bed, CLIENT_DNS, [f"warm-{tag}-{time.monotonic_ns()}"
                                            ".wild.example.com"], 0.5)
            return r["magic"] == 1

        wait_for(warm, 60, "the client's DNS server to answer an app name", step=0.5)
        rows = []
        pids = {n: bed.procs[n].pid for n in (CLIENT.name, CONNECTOR.name)}
        for label, server in (("dnsmasq direct (baseline)", DNS4), ("conn25d", CLIENT_DNS)):
            names = [f"b{i}-{label[:4]}-{tag}.wild.example.com" for i in range(args.names)]
            cpu = {n: cpu_seconds(p) for n, p in pids.items()}
            sys0 = {n: cpu_seconds(p, kernel_only=True) for n, p in pids.items()}
            spies = [] if not args.py_spy or server != CLIENT_DNS else [
                subprocess.Popen(["py-spy", "record", "--nonblocking", "--gil", "--format", "raw",
                                  "-r", "500", "-o", f"{args.py_spy}/{n}.txt", "-p", str(p)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for n, p in pids.items()]
            rows.append((label, run_burst(bed, server, names, args.retry)))
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=30)
            rows[-1][1]["cpu_s"] = {n: cpu_seconds(p) - cpu[n] for n, p in pids.items()}
            rows[-1][1]["sys_s"] = {n: cpu_seconds(p, kernel_only=True) - sys0[n]
                                    for n, p in pids.items()}
        metrics = (bed.status(CLIENT.name) or {}).get("metrics", {})
        upstream = (bed.status(CONNECTOR.name) or {}).get("metrics", {})
    base = rows[0][1]
    print(f"# burst benchmark — {platform.machine()}, {os.cpu_count()} CPUs\n")
    print(f"## {args.names} fresh app names asked at once by one client "
          f"(target: all answered with a magic IP within {TARGET_S:g} s)\n")
    print("| server | answered | with magic IP | resent | all answered after | p50 | p99 | "
          "x baseline (all) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        ratio = (f"{r['all_s'] / base['all_s']:.2f}" if r["all_s"] and base["all_s"] else "n/a")
        print(f"| {label} | {r['answered']} | {r['magic']} | {r['resent']} | "
              f"{fmt(r['all_s'], ' s')} | {fmt(r['p50_ms'], ' ms')} | {fmt(r['p99_ms'], ' ms')} "
              f"| {ratio} |")
    keys = ("registration_resolves", "registration_requests", "dns_mapped_in_resolution",
            "dns_coalesced",
            "dns_servfail_connector", "dns_servfail_register", "dns_servfail_ack_timeout")
    cpu, kernel = rows[1][1]["cpu_s"], rows[1][1]["sys_s"]
    print(f"\nCPU seconds of the daemons during the conn25d burst (of which in the kernel): "
          f"client {cpu[CLIENT.name]:.2f} ({kernel[CLIENT.name]:.2f}), "
          f"connector {cpu[CONNECTOR.name]:.2f} ({kernel[CONNECTOR.name]:.2f})")
    print("client counters after the run: "
          + ", ".join(f"{k} {metrics.get(k, 0)}" for k in keys))
    print("connector counters after the run: " + ", ".join(
        f"{k} {v}" for k, v in sorted(upstream.items())
        if v and (k.startswith("dns_forwarder") or "resolution" in k or "peerapi" in k)))
    if args.json:
        Path(args.json).write_text(json.dumps({label: r for label, r in rows}, indent=2) + "\n")
    ours = rows[1][1]
    return 0 if ours["all_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
