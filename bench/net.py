"""Network benchmark: conn25d beside kernel routing, kernel NAT and wireguard-go, in one run.

Builds its own namespaces (bench/paths.py: client, middle = connector, server =
"internet"; documentation and reserved addresses only) and measures, for each path in turn, with
the same tools against the same server:

    ping RTT avg and p99 (1,000 pings, 10 ms apart)
    new connection p50 and p99: DNS lookup + TCP connect + first byte of an HTTP
        response, 200 fresh names (for conn25d: 200 new assignments and registrations)
    iperf3 TCP, 1 and 4 streams, client -> server, --seconds each (Gbit/s), and the
        CPU seconds of the path's userspace processes per gigabit moved
    iperf3 UDP, 64-byte payloads, unlimited rate: packets per second received

Every figure is shown against path (a), plain kernel routing, measured in the same
run. wireguard-go is measured only when it and `wg` are installed.

    python bench/net.py [--seconds 10] [--json OUT] [--paths kernel,conn25d,...]   (as root)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from conn25.lab.netns import Netns, need_root
from paths import LABELS, PATHS, Bench, BenchPath, wireguard_missing
from pump import iperf

# 1,000 pings: the average of 200 moved by ±10 % between runs on this VM.
PINGS, PING_INTERVAL = 1000, 0.01
# conn25d's ping is compared with wireguard-go's, whose average moved between 0.46 and 0.99 ms
# over one day's runs as the machine's load changed; so with both paths measured, their
# pings alternate in rounds, both paths up, and each sees the same moments of the machine.
PING_ROUNDS = 10
INTERLEAVED = ("conn25d", "wireguard_go")
CONNECTIONS = 200
BASELINE, REFERENCE = "kernel", "wireguard_go"

# Run in the client namespace: argv = domain, count; prints {"ms": [...], "errors": [...]}.
# Each name is new (n<i>.<domain>), so each lookup is a fresh DNS answer.
NEW_CONNECTIONS = r"""
import json, socket, sys, time
domain, count = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
ms, errors = [], []
for i in range(count):
    if time.monotonic() > deadline:
        errors.append("deadline of 120 s reached")
        break
    name = f"n{i}.{domain}"
    t0 = time.perf_counter()
    try:
        addr = socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(addr)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            if not s.recv(1):
                raise OSError("connection closed before the first byte")
            ms.append((time.perf_counter() - t0) * 1000)
    except OSError as e:
        errors.append(f"{name}: {e}")
print(json.dumps({"ms": ms, "errors": errors}))
"""


@dataclasses.dataclass(frozen=True)
class Figure:
    key: str
    title: str
    higher_is_better: bool


FIGURES = (
    Figure("tcp1_gbit_s", "iperf3 TCP, 1 stream (Gbit/s)", True),
    Figure("tcp4_gbit_s", "iperf3 TCP, 4 streams (Gbit/s)", True),
    Figure("udp64_kpps", "iperf3 UDP, 64-byte payloads: received (kpps)", True),
    Figure("cpu_s_per_gbit_tcp1", "CPU seconds per Gbit of the path's processes, TCP 1 stream",
           False),
    Figure("cpu_s_per_gbit_tcp4", "CPU seconds per Gbit of the path's processes, TCP 4 streams",
           False),
    Figure("ping_avg_ms", "ping RTT, average (ms)", False),
    Figure("ping_p99_ms", "ping RTT, p99 (ms)", False),
    Figure("newconn_p50_ms", "new connection: DNS + TCP connect + first byte, p50 (ms)", False),
    Figure("newconn_p99_ms", "new connection: DNS + TCP connect + first byte, p99 (ms)", False),
)

Results = dict[str, dict[str, float | None]]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def ping_rtts(ns: Netns, target: str, count: int) -> list[float]:
    """The round trip times (ms) of `count` pings from `ns`; RuntimeError when more than a
    tenth went unanswered."""
    r = ns.run("ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL),
               "-W", "1", "-w", str(int(count * PING_INTERVAL) + 20), target, check=False,
               timeout=count * PING_INTERVAL + 30)
    rtts = [float(t) for t in re.findall(r"time=([\d.]+) ms", r.stdout)]
    if len(rtts) < count * 0.9:
        raise RuntimeError(f"ping {target}: {len(rtts)} of {count} answered\n{r.stderr}")
    return rtts


def ping_figures(rtts: list[float]) -> dict[str, float]:
    return {"ping_avg_ms": statistics.fmean(rtts), "ping_p99_ms": percentile(rtts, 99)}


def measure_ping(ns: Netns, target: str) -> dict[str, float]:
    return ping_figures(ping_rtts(ns, target, PINGS))


def measure_pings_interleaved(bench: Bench, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """PINGS pings per path, in PING_ROUNDS rounds that alternate between the paths (in turn
    first), with all of them up at once."""
    with contextlib.ExitStack() as up:
        targets = {key: up.enter_context(bench.path(key)).target for key in keys}
        rtts: dict[str, list[float]] = {key: [] for key in keys}
        for n in range(PING_ROUNDS):
            for key in keys if n % 2 == 0 else reversed(keys):
                rtts[key] += ping_rtts(bench.client, targets[key], PINGS // PING_ROUNDS)
    return {key: ping_figures(got) for key, got in rtts.items()}


def timed(ns: Netns, what: str, count: int, figure: str, timeout: float, script: str,
          *args: str) -> dict[str, float]:
    """Run `script` (it prints {"ms": [...], "errors": [...]} for `count` tries) in `ns`:
    {figure}_p50_ms and {figure}_p99_ms of its times; RuntimeError naming `what` if a try
    failed."""
    r = ns.run(sys.executable, "-c", script, *args, check=False, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed: {r.stderr.strip()}")
    got = json.loads(r.stdout)
    if got["errors"]:
        raise RuntimeError(f"{what}: {len(got['errors'])} of {count} failed, first: "
                           f"{got['errors'][0]}")
    return {f"{figure}_p50_ms": percentile(got["ms"], 50),
            f"{figure}_p99_ms": percentile(got["ms"], 99)}


def measure_new_connections(ns: Netns, domain: str,
                            count: int = CONNECTIONS) -> dict[str, float]:
    return timed(ns, f"new connections to *.{domain}", count, "newconn", 150, NEW_CONNECTIONS,
                 domain, str(count))


def measure_tcp(ns: Netns, p: BenchPath, seconds: int, streams: int) -> dict[str, float | None]:
    before = cpu_seconds(p.pids)
    end = iperf(ns, p.target, seconds, "-P", str(streams))
    used = cpu_seconds(p.pids) - before
    got = end["sum_received"]
    gbit = got["bytes"] * 8 / 1e9
    return {f"tcp{streams}_gbit_s": got["bits_per_second"] / 1e9,
            f"cpu_s_per_gbit_tcp{streams}": used / gbit if p.pids else None}


def measure_udp(ns: Netns, p: BenchPath, seconds: int) -> dict[str, float]:
    end = iperf(ns, p.target, seconds, "-u", "-b", "0", "-l", "64")
    s = end.get("sum_received", end["sum"])  # the receiver's view (older iperf3: "sum")
    return {"udp64_kpps": (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3}


def measure_path(bench: Bench, key: str, seconds: int,
                 pinged: dict[str, float] | None = None) -> dict[str, float | None]:
    """The path's figures; its ping figures are `pinged` when they were measured already
    (interleaved with another path's)."""
    got: dict[str, float | None] = dict(pinged or {})
    with bench.path(key) as p:
        # Latency first, on the idle path; then the loads.
        steps: list[Callable[[], dict]] = [
            lambda: pinged or measure_ping(bench.client, p.target),
            lambda: measure_new_connections(bench.client, p.domain),
            lambda: measure_tcp(bench.client, p, seconds, 1),
            lambda: measure_tcp(bench.client, p, seconds, 4),
            lambda: measure_udp(bench.client, p, seconds),
        ]
        for step in steps:
            got.update(step())
        if not all(os.path.exists(f"/proc/{pid}") for pid in p.pids):
            raise RuntimeError(f"a process of path {key} died during the run")
    return got


def measure_paths(bench: Bench, paths: Iterable[str], labels: dict[str, str],
                  measure: Callable[[str], dict[str, float | None]],
                  ) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """measure(key) for each path in turn: {key: its figures}, and the keys that failed.
    A failure is reported on stderr (with conn25d's logs), not raised: one broken path
    must not hide the others."""
    got: dict[str, dict[str, float | None]] = {}
    failed: list[str] = []
    for key in paths:
        print(f"measuring {labels[key]} ...", file=sys.stderr, flush=True)
        try:
            got[key] = measure(key)
        except Exception as e:
            failed.append(key)
            print(f"path {key} failed: {e}", file=sys.stderr)
            if key.startswith("conn25d"):
                for name in ("client", "connector"):
                    print(f"--- conn25d log of {name}\n{bench.log(name)[-3000:]}",
                          file=sys.stderr)
    return got, failed


# -- output ------------------------------------------------------------------------------

def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if abs(v) >= limit:
            return f"{v:.{digits}f}"
    return f"{v:.3f}"


def ratio(v: float | None, base: float | None) -> str:
    return "n/a" if v is None or not base else f"{v / base:.2f}"


def tables(results: Results, paths: list[str]) -> str:
    with_ref = REFERENCE in paths and REFERENCE != BASELINE
    out = []
    for f in FIGURES:
        row = results.get(f.key, {})
        base = row.get(BASELINE)
        ref = row.get(REFERENCE)
        out.append(f"### {f.title} ({'higher' if f.higher_is_better else 'lower'} is better)\n")
        head = "| path | value | x (a) |" + (" x (d) |" if with_ref else "")
        out.append(head)
        out.append("|---|---:|---:|" + ("---:|" if with_ref else ""))
        for key in paths:
            v = row.get(key)
            label = LABELS[key] + (" (baseline)" if key == BASELINE else "")
            line = f"| {label} | {fmt(v)} | {ratio(v, base)} |"
            if with_ref:
                line += f" {ratio(v, ref)} |"
            out.append(line)
        out.append("")
    return "\n".join(out)


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    iperf_v = subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.split("\n", 1)[0].strip()
    wg_v = "not installed"
    if shutil.which("wireguard-go"):
        wg_v = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.split("\n", 1)[0].strip()
    return (f"{platform.node()}: {os.cpu_count()} x {cpu}, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {iperf_v}, {wg_v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="length of each iperf3 run")
    ap.add_argument("--json", metavar="OUT", help="also write {figure: {path: value}} here")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of {','.join(PATHS)} (default: all)")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    if bad := [p for p in paths if p not in PATHS]:
        ap.error(f"--paths: unknown {', '.join(bad)}; choose from {', '.join(PATHS)}")
    if not 1 <= args.seconds <= 600:
        ap.error("--seconds: between 1 and 600")
    if (why := need_root()) is not None:
        print(f"bench/net.py {why}", file=sys.stderr)
        return 2
    if REFERENCE in paths and (why := wireguard_missing()) is not None:
        print(f"path {REFERENCE} skipped: {why}", file=sys.stderr)
        paths.remove(REFERENCE)
    # SIGTERM unwinds like Ctrl-C, so the finally clauses remove everything; a second
    # one must not interrupt that.
    def terminate(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminate)

    workdir = Path(tempfile.mkdtemp(prefix="conn25-bench-net-"))
    pinged: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    try:
        bench = Bench(workdir)
        with bench:
            if all(key in paths for key in INTERLEAVED):
                print("measuring ping, interleaved: "
                      + ", ".join(LABELS[key] for key in INTERLEAVED) + " ...",
                      file=sys.stderr, flush=True)
                try:
                    pinged = measure_pings_interleaved(bench, INTERLEAVED)
                except Exception as e:  # the paths' own runs measure ping then, one by one
                    print(f"interleaved ping failed: {e}", file=sys.stderr)
            got, failed = measure_paths(
                bench, paths, LABELS,
                lambda key: measure_path(bench, key, args.seconds, pinged.get(key)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results: Results = {f.key: {key: got.get(key, {}).get(f.key) for key in paths}
                        for f in FIGURES}

    interleaved = (f"the pings of {' and '.join(LABELS[k] for k in pinged)} alternate in "
                   f"{PING_ROUNDS} rounds with both paths up; " if pinged else "")
    print(f"# conn25d network benchmark\n\n{machine()}; iperf3 {args.seconds} s per run, "
          f"{PINGS} pings, {CONNECTIONS} new connections per path; {interleaved}"
          f"{time.monotonic() - started:.0f} s in all. x (a): ratio to path (a), the "
          f"baseline{'; x (d): ratio to wireguard-go' if REFERENCE in paths else ''}.\n")
    print(tables(results, paths))
    if failed:
        print(f"failed paths (no figures): {', '.join(failed)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
