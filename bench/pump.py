"""Pump benchmark: iperf3 through two bare datapath nodes in network namespaces.

The topology of tests/fastpath/pumpnet.py (client ns -> TUN -> UDP -> connector ns ->
TUN -> kernel, "server" on the connector's loopback). Each figure is measured
twice in the same run: through conn25's pumps (client connects to the magic
IP) and over the plain veth between the namespaces (the baseline: the kernel
alone), and shown as a ratio. Bounded: every iperf3 run lasts --seconds; the
ping figure is --pings pings 10 ms apart (RTT average and p99).

    python bench/pump.py [--seconds 5] [--pings 300] [--figures tcp,udp,ping]
                         [--tun plain|vnet|offload]   (as root)

--tun: how the nodes open their TUN devices: plain (the default: no virtio-net header),
vnet (the header, writes joined into super-packets: what conn25d does) or offload (vnet
and TSO/USO super-packets on reads, split by the datapath: conn25d --tun-offload).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

# The pump tests' topology (pumpnet) and the session keys it gives the nodes (wgsessions).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fastpath"))

from pumpnet import MAGIC, REAL, pump_topology, stop_node

from conn25.lab.netns import Netns, need_root, wait_for


def iperf(ns: Netns, target: str, seconds: int, *extra: str) -> dict:
    # The server can still be closing the previous test when the next one
    # starts; iperf3 then fails at once, and a second try is enough.
    for attempt in range(3):
        r = ns.run("iperf3", "-c", target, "-J", "-t", str(seconds), *extra, check=False,
                   timeout=seconds + 30)
        data = json.loads(r.stdout)
        if "error" not in data:
            return data["end"]
        print(f"iperf3 -c {target} {' '.join(extra)}: {data['error']} (try {attempt + 1})",
              file=sys.stderr)
    raise RuntimeError(f"iperf3 to {target} failed: {data['error']}")


def ping(ns: Netns, target: str, count: int) -> list[float]:
    """RTTs (ms) of `count` pings 10 ms apart (sparse traffic: every pump sleeps between them)."""
    r = ns.run("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "2",
               target, check=False, timeout=count * 0.01 + 30)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", r.stdout)]
    if len(rtts) < count * 0.95:
        raise RuntimeError(f"ping {target}: {len(rtts)} of {count} answered\n{r.stderr}")
    return rtts


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(0.99 * (len(v) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    ap.add_argument("--pings", type=int, default=300, help="pings for the RTT figures")
    ap.add_argument("--figures", default="tcp,udp,ping",
                    help="which figures, comma-separated: tcp, udp, ping")
    ap.add_argument("--tun", choices=("plain", "vnet", "offload"), default="offload",
                    help="the nodes' TUN devices: no virtio-net header, the header (conn25d "
                    "--tun-offload=false), or the header and TUN offloads (conn25d's default; "
                    "the default here too)")
    ap.add_argument("--sockbuf", type=int, default=4096, metavar="KIB",
                    help="the overlay sockets' send and receive buffers (default 4096 KiB, "
                    "as conn25d)")
    args = ap.parse_args()
    figures = set(args.figures.split(","))
    if figures - {"tcp", "udp", "ping"}:
        ap.error(f"--figures: unknown {', '.join(sorted(figures - {'tcp', 'udp', 'ping'}))}")
    if (why := need_root()) is not None:
        print(f"bench/pump.py {why}", file=sys.stderr)
        return 2
    rows = []
    with pump_topology(args.tun, args.sockbuf << 10) as (client, connector, c, k):
        # Bound to the server address, so UDP replies leave from it on both paths.
        connector.popen("iperf3", "-s", "-B", REAL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        wait_for(lambda: "5201" in connector.run("ss", "-Hltn", "sport = :5201").stdout,
                 20, "the iperf3 server")
        # The direct path: the connector's real address over the veth.
        client.run("ip", "route", "add", f"{REAL}/32", "via", "192.0.2.2")
        if "ping" in figures:
            got = {path: ping(client, target, args.pings)
                   for path, target in (("kernel", REAL), ("conn25", MAGIC))}
            for name, f in (("ping RTT avg (ms)", statistics.fmean), ("ping RTT p99 (ms)", p99)):
                ours, base = f(got["conn25"]), f(got["kernel"])
                rows.append((name, ours, base, ours / base))
        for name, opts, key in (
            ("TCP, 1 stream (Gbit/s)", (), "tcp"),
            ("UDP 64-byte payloads (kpps)", ("-u", "-b", "0", "-l", "64"), "udp"),
        ):
            if key not in figures:
                continue
            got = {}
            for path, target in (("kernel", REAL), ("conn25", MAGIC)):
                end = iperf(client, target, args.seconds, *opts)
                if key == "tcp":
                    got[path] = end["sum_received"]["bits_per_second"] / 1e9
                else:
                    s = end["sum"]
                    got[path] = s["packets"] * (1 - s["lost_percent"] / 100) / s["seconds"] / 1e3
            rows.append((name, got["conn25"], got["kernel"], got["conn25"] / got["kernel"]))
        cend, kend = stop_node(c), stop_node(k)
        cstats, kstats = cend["counters"], kend["counters"]
    print(f"# pump benchmark — {platform.machine()}, iperf3 {args.seconds:g} s per figure, "
          f"TUN {args.tun} (offload: client {cend.get('offload', 'off')}, connector "
          f"{kend.get('offload', 'off')})\n")
    print("| figure | conn25 pumps | kernel veth (baseline) | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, base, ratio in rows:
        print(f"| {name} | {ours:.3f} | {base:.3f} | {ratio:.2f} |" if "ms" in name
              else f"| {name} | {ours:.2f} | {base:.2f} | {ratio:.2f} |")
    drops = {n: v for n, v in {**cstats, **kstats}.items() if n.startswith("drop_") and v}
    print(f"\nclient translated {cstats['translated']}, connector translated "
          f"{kstats['translated']}; drops: {drops or 'none'}")
    # Packets read from the TUN by the UDP -> TUN thread, right after its writes
    # (absent from builds before that change).
    after = [s.get("tun_rx_after_write") for s in (cstats, kstats)]
    print(f"TUN packets read after a write (of all TUN reads): client {after[0]} of "
          f"{cstats['tun_rx']}, connector {after[1]} of {kstats['tun_rx']}")
    split = [(s.get("tun_rx_super_packets", 0), s.get("tun_rx_segments", 0))
             for s in (cstats, kstats)]
    print(f"super-packets read and split (segments): client {split[0][0]} ({split[0][1]}), "
          f"connector {split[1][0]} ({split[1][1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
