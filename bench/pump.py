"""Pump benchmark: iperf3 through two bare datapath nodes in network namespaces.

The topology of tests/pumpnet.py (client ns -> TUN -> UDP -> connector ns ->
TUN -> kernel, "server" on the connector's loopback). Each figure is measured
twice in the same run: through conn25's pumps (client connects to the magic
IP) and over the plain veth between the namespaces (the baseline: the kernel
alone), and shown as a ratio. Bounded: every iperf3 run lasts --seconds.

    python bench/pump.py [--seconds 5]      (as root)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conn25.netns import Netns, need_root, wait_for
from pumpnet import MAGIC, REAL, pump_topology, stop_node


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="length of each iperf3 run")
    args = ap.parse_args()
    if (why := need_root()) is not None:
        print(f"bench/pump.py {why}", file=sys.stderr)
        return 2
    rows = []
    with pump_topology() as (client, connector, c, k):
        # Bound to the server address, so UDP replies leave from it on both paths.
        connector.popen("iperf3", "-s", "-B", REAL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        wait_for(lambda: "5201" in connector.run("ss", "-Hltn", "sport = :5201").stdout,
                 20, "the iperf3 server")
        # The direct path: the connector's real address over the veth.
        client.run("ip", "route", "add", f"{REAL}/32", "via", "192.0.2.2")
        for name, opts, key in (
            ("TCP, 1 stream (Gbit/s)", (), "tcp"),
            ("UDP 64-byte payloads (kpps)", ("-u", "-b", "0", "-l", "64"), "udp"),
        ):
            got = {}
            for path, target in (("kernel", REAL), ("conn25", MAGIC)):
                end = iperf(client, target, args.seconds, *opts)
                if key == "tcp":
                    got[path] = end["sum_received"]["bits_per_second"] / 1e9
                else:
                    s = end["sum"]
                    got[path] = s["packets"] * (1 - s["lost_percent"] / 100) / s["seconds"] / 1e3
            rows.append((name, got["conn25"], got["kernel"], got["conn25"] / got["kernel"]))
        cstats = stop_node(c)["counters"]
        kstats = stop_node(k)["counters"]
    print(f"# pump benchmark — {platform.machine()}, iperf3 {args.seconds:g} s per figure\n")
    print("| figure | conn25 pumps | kernel veth (baseline) | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, base, ratio in rows:
        print(f"| {name} | {ours:.2f} | {base:.2f} | {ratio:.2f} |")
    drops = {n: v for n, v in {**cstats, **kstats}.items() if n.startswith("drop_") and v}
    print(f"\nclient translated {cstats['translated']}, connector translated "
          f"{kstats['translated']}; drops: {drops or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
