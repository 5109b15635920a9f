"""Profile the pumps under iperf3: where the CPU goes while a TCP stream (or
small-packet UDP) runs through the two bare datapath nodes of bench/pump.py.

Samples the whole machine with `perf record -e cpu-clock -a -g` (software
clock: this VM has no hardware counters) for the middle of one iperf3 run,
and reads /proc for how busy each core and each pump thread was. Writes
perf.data to --out and prints the busy figures; inspect the profile with
`perf report -i OUT --no-children --sort comm,dso,sym`.

    python bench/profile_pump.py [--seconds 10] [--udp] [--tun offload] [--out /tmp/pump.perf]
                                                                                 (as root)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

# The pump tests' topology (pumpnet) and the session keys it gives the nodes (wgsessions).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fastpath"))

from pumpnet import MAGIC, REAL, pump_topology, stop_node

from conn25.lab.netns import need_root, wait_for

TICK = os.sysconf("SC_CLK_TCK")
SYSCALLS = ("poll", "ppoll", "read", "write", "sendmmsg", "recvmmsg", "sendto", "epoll_wait")


def cpu_times() -> list[tuple[int, int]]:
    """(busy, total) jiffies per core."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + v[4]
                out.append((sum(v) - idle, sum(v)))
    return out


def thread_times(pid: int) -> dict[str, tuple[float, int]]:
    """(CPU seconds (user + system), context switches) per thread of process pid."""
    out: dict[str, tuple[float, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except FileNotFoundError:
            continue
        # Python 3.11 does not name OS threads: tell them apart by tid.
        name = f"{s[s.index('(') + 1:s.rindex(')')]}/{tid}"
        fields = s[s.rindex(")") + 2:].split()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            sw = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        out[name] = ((int(fields[11]) + int(fields[12])) / TICK, sw)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of the iperf3 run")
    ap.add_argument("--udp", action="store_true", help="64-byte UDP instead of one TCP stream")
    ap.add_argument("--out", default="/tmp/pump.perf", help="where perf.data goes")
    ap.add_argument("--tun", choices=("plain", "vnet", "offload"), default="offload",
                    help="the TUN's mode (pumpnet.pump_topology): offload is the daemon's "
                    "default (default offload)")
    ap.add_argument("--count", action="store_true",
                    help="count the pumps' syscalls (perf stat) instead of sampling")
    args = ap.parse_args()
    if (why := need_root()) is not None:
        print(f"bench/profile_pump.py {why}", file=sys.stderr)
        return 2
    with pump_topology(args.tun) as (client, connector, c, k):
        connector.popen("iperf3", "-s", "-B", REAL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        wait_for(lambda: "5201" in connector.run("ss", "-Hltn", "sport = :5201").stdout,
                 20, "the iperf3 server")
        opts = ("-u", "-b", "0", "-l", "64") if args.udp else ()
        result: dict = {}

        def run_iperf() -> None:
            r = client.run("iperf3", "-c", MAGIC, "-J", "-t", str(args.seconds), *opts,
                           check=False, timeout=args.seconds + 30)
            result.update(json.loads(r.stdout))

        t = threading.Thread(target=run_iperf)
        t.start()
        time.sleep(1.5)  # past slow start
        window = max(1, args.seconds - 3)
        cpu0 = cpu_times()
        th0 = {n: thread_times(p.pid) for n, p in (("client", c), ("connector", k))}
        if args.count:
            events = ",".join(f"syscalls:sys_enter_{n}" for n in SYSCALLS)
            counted = subprocess.run(
                ["perf", "stat", "--per-thread", "-x", ",", "-e", events, "-p",
                 f"{c.pid},{k.pid}", "--", "sleep", str(window)],
                capture_output=True, text=True).stderr
        else:
            subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-a", "-g",
                            "-o", args.out, "--", "sleep", str(window)], check=True)
        cpu1 = cpu_times()
        th1 = {n: thread_times(p.pid) for n, p in (("client", c), ("connector", k))}
        t.join()
        cstats = stop_node(c)["counters"]
        kstats = stop_node(k)["counters"]
    end = result.get("end", {})
    if args.udp:
        s = end.get("sum", {})
        print(f"iperf3 UDP: {s.get('packets', 0) / max(s.get('seconds', 1), 1e-9) / 1e3:.1f} kpps "
              f"sent, lost {s.get('lost_percent', 0):.1f} %")
    else:
        print(f"iperf3 TCP: {end.get('sum_received', {}).get('bits_per_second', 0) / 1e9:.2f} "
              f"Gbit/s, retransmits {end.get('sum_sent', {}).get('retransmits')}")
    for i, ((b0, t0), (b1, t1)) in enumerate(zip(cpu0, cpu1, strict=True)):
        print(f"cpu{i}: {100 * (b1 - b0) / max(t1 - t0, 1):.0f} % busy")
    for node in ("client", "connector"):
        for name, (secs, sw) in sorted(th1[node].items()):
            s0, sw0 = th0[node].get(name, (0.0, 0))
            if secs - s0 > 0.01:
                print(f"{node} thread {name}: {100 * (secs - s0) / window:.0f} % of a core, "
                      f"{(sw - sw0) / window / 1e3:.1f} k context switches/s")
    if args.count:
        for line in counted.splitlines():
            f = line.split(",")
            if len(f) > 3 and f[1].isdigit() and int(f[1]) > 0:
                print(f"{f[0]}: {f[3].removeprefix('syscalls:sys_enter_')} "
                      f"{int(f[1]) / window / 1e3:.1f} k/s")
    for name, st in (("client", cstats), ("connector", kstats)):
        print(f"{name}: tun_rx {st['tun_rx']} udp_tx {st['udp_tx']} udp_rx {st['udp_rx']} "
              f"tun_tx {st['tun_tx']} errors {st['tun_write_errors']}/{st['udp_send_errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
