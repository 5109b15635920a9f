"""Control-plane benchmark: the client's DNS server, transit-IP registrations, connector memory.

Every figure is shown against a baseline measured in the same run:

* DNS. dnsperf in the client namespace of a conn25.lab.testbed tailnet (client and
  connector run the real `conn25d up`) asks the client's DNS server for an app
  name whose assignment is cached (the same name again and again: each query
  still goes to the connector's dns-query endpoint) and for a non-app name
  (forwarded), then asks the upstream dnsmasq the same names directly (the
  baseline, which is also the ceiling of the load generator). Queries per
  second and p50/p99 latency with 100 queries outstanding, and p50/p99 with
  one query outstanding (the service time without queueing).
* Registrations, batches of 100 items carrying the app's domain. The baseline
  is ConnectorTable.handle_request in this process with the per-peer limit
  lifted; then the peer API's work without sockets (decode, resolution check,
  register, datapath install, encode); then the real connector's peer API
  over HTTP through the tunnel from the client, once with the per-peer limit
  lifted (the connector restarted with the limit's defaults patched at
  start-up: conn25d has no option for it) and once as shipped, which shows
  what the limit (connector.DEFAULT_RATE / DEFAULT_BURST) caps.
* Memory (bench/memory.py, a fresh process). It imports what `conn25d up`
  imports and builds a connector node's state as `conn25d up
  --advertise-connector` does (configuration, ConnectorTable,
  Datapath(client=True, connector=True), its tables, the overlay's peers),
  fills it with 100,000 mappings (two peers) and 100,000 flows created by
  Datapath.process_datagram, against the same process with empty tables.

    python bench/control.py [--json OUT] [--seconds 5] [--log-level info]
                                                        (as root; needs dnsperf)

Bounded: each DNS and registration figure runs --seconds; the whole run takes
about a minute and a half.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conn25.core import dnsname, peerapi
from conn25.core.config import NodeConfig
from conn25.core.connector import (
    DEFAULT_BURST,
    DEFAULT_RATE,
    RATE_LIMITED_MESSAGE,
    ConnectorTable,
    MappingStore,
)
from conn25.core.peerapi import TRANSIT_IP_PATH, ConnectorTransitIPRequest, TransitIPRequest
from conn25.core.policy import node_config
from conn25.core.tailnet import load as load_tailnet
from conn25.daemon import keyfile
from conn25.lab.netns import Netns, need_root, wait_for
from conn25.lab.testbed import DEFAULT_NODES, DNS4, WEB4, NodeSpec, Testbed, tailnet_file

HERE = Path(__file__).resolve()
SPECS = {n.name: n for n in DEFAULT_NODES}
CLIENT, CONNECTOR = SPECS["client"], SPECS["conn1"]
CLIENT_DNS = "100.100.100.100"  # conn25d's default --dns-listen
PEERAPI_PORT = 41642  # conn25.daemon.node.PEERAPI_PORT (not imported: node pulls in pyroute2)
APP_NAME, NON_APP_NAME = "example.com", "direct.example.net"  # both dnsmasq host records
BATCH = 100
# Transits the bench registers: the top quarter of the default v4 transit pool, clear
# of the client daemon's own assignments (allocated from the bottom).
TRANSIT_BASE, TRANSIT_COUNT = int(ipaddress.ip_address("169.254.192.0")), 16384
ITEMS = 100_000  # memory: mappings and flows


def mib(kib: float) -> float:
    return kib / 1024


# -- the testbed's policy, in process --------------------------------------------------


def connector_config(nodes: tuple[NodeSpec, ...] = (CLIENT, CONNECTOR)) -> NodeConfig:
    """conn1's view of the testbed tailnet (by default: client and connector only)."""
    tailnet = load_tailnet(tailnet_file(nodes), "testbed")
    return node_config(tailnet, CONNECTOR.name, advertise_connector=True)


def app_name(cfg: NodeConfig) -> str:
    return cfg.own_apps[0].name


def bodies(app: str) -> list[bytes]:
    """Registration bodies of BATCH items each, cycling once through the bench's transits."""
    out = []
    for start in range(0, TRANSIT_COUNT - BATCH + 1, BATCH):
        items = [TransitIPRequest(str(ipaddress.IPv4Address(TRANSIT_BASE + start + i)), WEB4,
                                  app, APP_NAME) for i in range(BATCH)]
        out.append(peerapi.encode(ConnectorTransitIPRequest(items)))
    return out


# -- /proc ---------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, ... of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int, *, kernel_only: bool = False) -> float:
    """utime + stime of a process (stime alone with ``kernel_only``), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = int(fields[12]) + (0 if kernel_only else int(fields[11]))
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def client_and_connector(workdir: Path, log_level: str) -> Iterator[Testbed]:
    """A testbed with the client and the connector running `conn25d up`; their logs'
    tails on stderr when the block fails; everything removed after."""
    bed = Testbed(workdir / "testbed", (CLIENT, CONNECTOR))
    try:
        for name in (CONNECTOR.name, CLIENT.name):
            bed.start(name, "--log-level", log_level)  # not the testbed's debug
        yield bed
    except BaseException:
        for name in (CLIENT.name, CONNECTOR.name):
            print(f"--- {name} log (tail)\n{bed.log(name)[-3000:]}", file=sys.stderr)
        raise
    finally:
        bed.close()


# -- DNS --------------------------------------------------------------------------------------


def dnsperf(ns: Netns, workdir: Path, server: str, name: str, seconds: float,
            outstanding: int, watch: list[int]) -> dict[str, Any]:
    """One dnsperf run asking `server` for `name` A; qps, latencies and CPU used."""
    qfile = workdir / "queries.txt"
    qfile.write_text(f"{name} A\n")
    out = workdir / "dnsperf.out"
    clients = min(outstanding, 4)
    args = ["dnsperf", "-s", server, "-d", str(qfile), "-l", str(seconds), "-q",
            str(outstanding), "-c", str(clients), "-t", "2", "-v"]
    cpu0 = [cpu_seconds(p) for p in watch]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as f:
        proc = ns.popen(*args, stdout=f, stderr=subprocess.STDOUT)
        proc.wait(timeout=seconds + 30)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = [cpu_seconds(p) for p in watch]
    lat: list[float] = []
    rcodes: Counter[str] = Counter()
    qps = lost = None
    with open(out) as f:
        for line in f:
            if line.startswith("> "):
                parts = line.split()
                if len(parts) >= 5:
                    rcodes[parts[1]] += 1
                    with contextlib.suppress(ValueError):
                        lat.append(float(parts[-1]))
            elif "Queries per second:" in line:
                qps = float(line.split(":")[1])
            elif "Queries lost:" in line:
                lost = int(line.split(":")[1].split()[0])
    if qps is None or not lat:
        raise RuntimeError(f"dnsperf {' '.join(args)} gave no statistics:\n"
                           + out.read_text()[-2000:])
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3

    answered = sum(rcodes.values())
    return {"qps": qps, "p50": pct(0.50), "p99": pct(0.99), "lost": lost or 0,
            "noerror": rcodes["NOERROR"] / answered if answered else 0.0,
            "rcodes": dict(rcodes),
            "gen_cpu": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "conn25d_cpu": sum(cpu1) - sum(cpu0), "seconds": seconds}


def dns_figures(bed: Testbed, workdir: Path, seconds: float) -> list[dict[str, Any]]:
    ns = bed.ns[CLIENT.name]
    watch = [bed.procs[CLIENT.name].pid, bed.procs[CONNECTOR.name].pid]

    def warm() -> bool:
        # Until the client has a healthy connector and the assignment is made and acked.
        try:
            r = dnsperf(ns, workdir, CLIENT_DNS, APP_NAME, 1, 1, watch)
        except RuntimeError:  # nothing answered in time
            return False
        return r["noerror"] == 1.0

    wait_for(warm, 60, f"the client's DNS server to answer {APP_NAME}", step=0.5)
    rows = []
    for what, name in (("app name, assignment cached", APP_NAME),
                       ("non-app name, forwarded", NON_APP_NAME)):
        for server, label in ((DNS4, "upstream dnsmasq direct"), (CLIENT_DNS, "conn25d")):
            loaded = dnsperf(ns, workdir, server, name, seconds, 100, watch)
            single = dnsperf(ns, workdir, server, name, seconds, 1, watch)
            rows.append({"query": what, "name": name, "server": label, "loaded": loaded,
                         "single": single})
    doc = bed.status(CLIENT.name) or {}
    rows[0]["client_metrics"] = {k: v for k, v in doc.get("metrics", {}).items()
                                 if k.startswith("dns_") and v}
    return rows


def print_dns(rows: list[dict[str, Any]], seconds: float) -> None:
    print(f"## DNS: the client's conn25d DNS server vs the upstream dnsmasq "
          f"(dnsperf, {seconds:g} s per figure)\n")
    print("| query | server | qps (100 outstanding) | x direct | p50 ms | p99 ms | x direct "
          "| 1 outstanding: p50 ms | p99 ms | x direct | NOERROR | conn25d CPU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["name"] == r["name"] and b["server"] != "conn25d")
        lo, so, lb, sb = r["loaded"], r["single"], base["loaded"], base["single"]
        print(f"| {r['query']} | {r['server']} | {lo['qps']:,.0f} | {lo['qps'] / lb['qps']:.3f} "
              f"| {lo['p50']:.2f} | {lo['p99']:.2f} | {lo['p99'] / lb['p99']:.1f} "
              f"| {so['p50']:.2f} | {so['p99']:.2f} | {so['p99'] / sb['p99']:.1f} "
              f"| {lo['noerror']:.1%}"
              f"{f' ({lost:,} lost)' if (lost := lo['lost'] + so['lost']) else ''} "
              f"| {lo['conn25d_cpu'] / lo['seconds']:.0%} |")
    direct = max((r["loaded"] for r in rows if r["server"] != "conn25d"), key=lambda d: d["qps"])
    print(f"\nLoad generator: dnsperf; against dnsmasq directly it reached {direct['qps']:,.0f} "
          f"qps using {direct['gen_cpu'] / direct['seconds']:.0%} of one core "
          f"({direct['qps'] / 20_000:.1f}x the 20,000 qps aim), so it is not the bottleneck "
          "of the conn25d figures. \"conn25d CPU\": client + connector daemons, share of one "
          "core, during the loaded run. Every query is the same name, A record.")
    metrics = rows[0].get("client_metrics", {})
    print("Client resolver counters after the DNS runs (non-zero): "
          + (", ".join(f"{k.removeprefix('dns_')} {v:,}" for k, v in sorted(metrics.items()))
             or "none") + ".\n")


# -- registrations ----------------------------------------------------------------------------


def bench_handler(seconds: float) -> list[dict[str, Any]]:
    """Items/s of ConnectorTable.handle_request, and of the peer API's work without sockets."""
    from conn25.daemon.dataplane import Dataplane, Ids
    from conn25.fastpath import Datapath

    cfg = connector_config()
    peer = cfg.tailnet.node(CLIENT.name)
    assert peer is not None
    app = app_name(cfg)
    reqs = [peerapi.decode_transit_request(b) for b in bodies(app)]
    raw = [peerapi.encode(r) for r in reqs]
    out = []

    def fresh(store: MappingStore | None = None) -> ConnectorTable:
        table = ConnectorTable(cfg, rate=1e12, burst=1 << 40, store=store)
        table.note_resolution(app, dnsname.normalize(APP_NAME),
                              [(ipaddress.ip_address(WEB4), 3600)], time.time())
        return table

    table = fresh()

    def handler(i: int) -> int:
        resp = table.handle_request(peer, reqs[i % len(reqs)], time.time())
        return sum(r.code == peerapi.Code.OK for r in resp.transit_ips)

    out.append(("ConnectorTable.handle_request, in process, no limit (baseline)",
                "handler_in_process", timed(handler, seconds)))

    dp = Datapath(client=True, connector=True)
    table = fresh(Dataplane(dp.tables, Ids()).connector_store)  # as the node: mappings in C

    def peerapi_work(i: int) -> int:
        # What PeerAPI._transit_ip does between the HTTP layer and the response.
        body = raw[i % len(raw)]
        now = time.time()
        stored = []
        pending = table.needs_resolution(peer, peerapi.decode_transit_request(body), now)
        assert not pending  # the destination was noted as resolved above

        def register(r: ConnectorTransitIPRequest) -> peerapi.ConnectorTransitIPResponse:
            resp, new = table.register(peer, r, now)
            stored.extend(new)
            return resp

        status, _ = peerapi.transit_ip_http("POST", body, register)
        assert status == 200  # (register put the mappings into the datapath's table)
        return len(stored)

    out.append(("peer API work without sockets (decode, check, register, datapath, encode)",
                "peerapi_in_process", timed(peerapi_work, seconds)))
    return [{"what": what, "key": key, **r} for what, key, r in out]


def timed(fn: Callable[[int], int], seconds: float) -> dict[str, Any]:
    ok = calls = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        ok += fn(calls)
        calls += 1
    return {"ok_per_s": ok / elapsed, "items_per_s": calls * BATCH / elapsed,
            "requests_per_s": calls / elapsed, "seconds": elapsed, "codes": {"ok": ok}}


def post_load(seconds: float, concurrency: int) -> dict[str, Any]:
    """In the client namespace: POST batches to the connector's peer API for `seconds`."""
    import trio

    from conn25.daemon import http

    cfg = connector_config()
    payloads = bodies(app_name(cfg))
    codes: Counter[str] = Counter()
    samples: dict[str, str] = {}
    lat: list[float] = []

    async def worker(k: int, deadline: float) -> None:
        i = k
        while trio.current_time() < deadline:
            t = time.perf_counter()
            status, body = await http.request(CONNECTOR.overlay4, PEERAPI_PORT, "POST",
                                              TRANSIT_IP_PATH, payloads[i % len(payloads)],
                                              timeout=10)
            lat.append(time.perf_counter() - t)
            i += concurrency
            if status != 200:
                codes[f"http_{status}"] += 1
                samples.setdefault(f"http_{status}", body.decode(errors="replace")[:200])
                continue
            for r in peerapi.decode_transit_response(body).transit_ips:
                key = ("ok" if r.code == peerapi.Code.OK else
                       "rate_limited" if r.message == RATE_LIMITED_MESSAGE else f"code_{r.code}")
                codes[key] += 1
                if key not in ("ok", "rate_limited"):
                    samples.setdefault(key, r.message)

    async def main() -> float:
        t0 = time.perf_counter()
        deadline = trio.current_time() + seconds
        async with trio.open_nursery() as nursery:
            for k in range(concurrency):
                nursery.start_soon(worker, k, deadline)
        return time.perf_counter() - t0

    elapsed = trio.run(main)
    lat.sort()
    items = sum(codes.values())
    return {"ok_per_s": codes["ok"] / elapsed, "items_per_s": items / elapsed,
            "requests_per_s": len(lat) / elapsed, "seconds": elapsed, "codes": dict(codes),
            "samples": samples, "p50_ms": lat[len(lat) // 2] * 1e3 if lat else 0.0,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3 if lat else 0.0}


def run_post_load(bed: Testbed, seconds: float, concurrency: int) -> dict[str, Any]:
    r = bed.run(CLIENT.name, sys.executable, str(HERE), "--_post-load", str(seconds),
                str(concurrency), timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"registration load generator failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


NO_LIMIT_SITECUSTOMIZE = """\
# Written by bench/control.py: lifts the connector's per-peer registration limit
# and the peer API's per-peer request rate for one run (conn25d has no option for
# them). Before conn25.daemon.node is imported, so the node serves the lifted limits.
import dataclasses as _d
import conn25.core.connector as _c
import conn25.daemon.peerapi_server as _p
_c.ConnectorTable.__init__.__kwdefaults__.update(rate=1e12, burst=1 << 40)
_p.PEERAPI_LIMITS = _d.replace(_p.PEERAPI_LIMITS, per_source=_d.replace(
    _p.PEERAPI_LIMITS.per_source, rate=1e12, burst=1 << 40))
"""


def registration_figures(bed: Testbed, workdir: Path, seconds: float, concurrency: int,
                         log_level: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows = []
    rss = {"connector_idle": proc_status(bed.procs[CONNECTOR.name].pid)["VmRSS"]}
    shipped = run_post_load(bed, seconds, concurrency)
    rss["connector_after_limited_run"] = proc_status(bed.procs[CONNECTOR.name].pid)["VmRSS"]
    # Restart the connector with the limit lifted (the client's health check follows).
    bed.stop(CONNECTOR.name)
    site = workdir / "nolimit"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_LIMIT_SITECUSTOMIZE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), old) if p)
    try:
        bed.start(CONNECTOR.name, "--log-level", log_level)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    unlimited = run_post_load(bed, seconds, concurrency)
    rss["connector_after_unlimited_run"] = proc_status(bed.procs[CONNECTOR.name].pid)["VmRSS"]
    if unlimited["codes"].get("rate_limited"):
        raise RuntimeError("the connector's rate limit was not lifted (sitecustomize not loaded?)")
    rows.append({"what": "conn25d connector over HTTP through the tunnel, limit lifted",
                 "key": "http_tunnel_no_limit", **unlimited})
    rows.append({"what": f"conn25d connector over HTTP through the tunnel, as shipped "
                         f"(limit {DEFAULT_RATE:g}/s, burst {DEFAULT_BURST})",
                 "key": "http_tunnel_default_limit", **shipped})
    return rows, rss


def print_registrations(rows: list[dict[str, Any]], seconds: float, concurrency: int) -> None:
    base = rows[0]["ok_per_s"]
    print(f"## Control plane: transit-IP registrations (batches of {BATCH}, "
          f"{seconds:g} s per figure)\n")
    print("| path | accepted items/s | x in-process handler | items answered/s | requests/s "
          "| request p99 ms | outcomes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        p99 = f"{r['p99_ms']:.1f}" if "p99_ms" in r else "-"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
        print(f"| {r['what']} | {r['ok_per_s']:,.0f} | {r['ok_per_s'] / base:.3f} "
              f"| {r['items_per_s']:,.0f} | {r['requests_per_s']:,.1f} | {p99} | {outcomes} |")
    shipped = rows[-1]
    cap = (DEFAULT_BURST + DEFAULT_RATE * shipped["seconds"]) / shipped["seconds"]
    print(f"\nHTTP rows: the client namespace's load generator (conn25.daemon.http.request, a new "
          f"connection per request as the daemon's registrar, {concurrency} at a time) to "
          f"{CONNECTOR.overlay4}:{PEERAPI_PORT}, through both daemons' datapaths. As shipped, "
          f"one peer gets its burst of {DEFAULT_BURST} and then {DEFAULT_RATE:g}/s: at most "
          f"{cap:,.0f} accepted items/s averaged over {shipped['seconds']:.1f} s; the rest "
          "are answered 'rate limited' (code 1).\n")
    for r in rows:
        for key, msg in r.get("samples", {}).items():
            print(f"- {r['key']}: {key}: {msg}")


# -- memory --------------------------------------------------------------------------------------


def run_memory() -> dict[str, Any]:
    """bench/memory.py in a fresh process, as the testbed's connector conn1 (all nodes)."""
    with tempfile.TemporaryDirectory(prefix="conn25-memory-") as tmp:
        tailnet, key = Path(tmp) / "tailnet.hujson", Path(tmp) / "private.key"
        tailnet.write_text(tailnet_file(DEFAULT_NODES))
        keyfile.create(key, CONNECTOR.private_key)
        r = subprocess.run([sys.executable, str(HERE.parent / "memory.py"), str(tailnet),
                            CONNECTOR.name, str(key)], capture_output=True, text=True,
                           timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"memory benchmark failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def print_memory(m: dict[str, Any], daemon: dict[str, int] | None) -> None:
    empty = m["empty"]["VmRSS"]
    print(f"## Memory: a connector node with {ITEMS:,} mappings and {ITEMS:,} flows "
          "(fresh process, cumulative)\n")
    print("| state | VmRSS MiB | RssAnon MiB | x empty node | step MiB | per item |")
    print("|---|---:|---:|---:|---:|---:|")
    steps = [
        (f"interpreter + the {m['node_modules']} modules `conn25d up` imports", "interpreter",
         None),
        ("empty connector node (baseline): config, key, ConnectorTable, Datapath(client, "
         "connector) with its tables, overlay peers (2 peers may use the app)", "empty", None),
        (f"+ {m['resolution_count']:,} resolution records (destinations the app resolved to)",
         "resolutions", m["resolution_count"]),
        (f"+ {m['mapping_count']:,} mappings registered as the peer API does "
         "(ConnectorTable.register, then the datapath's transit table)", "mappings",
         m["mapping_count"]),
        (f"+ {m['flow_count']:,} flows (process_datagram, events drained)", "flows",
         m["flow_count"]),
    ]
    prev = None
    for label, key, count in steps:
        st = m[key]
        step = (st["VmRSS"] - prev) if prev is not None else None
        each = f"{step * 1024 / count:,.0f} B" if count and step is not None else ""
        shown = f"{mib(step):.1f}" if step is not None else ""
        print(f"| {label} | {mib(st['VmRSS']):.1f} | {mib(st['RssAnon']):.1f} "
              f"| {st['VmRSS'] / empty:.2f} | {shown} | {each} |")
        prev = st["VmRSS"]
    total = mib(m["flows"]["VmRSS"])
    verdict = "meets" if total < 64 else "misses"
    ft = m["flowtable"]
    print(f"\nTotal {total:.1f} MiB (peak {mib(m['flows']['VmHWM']):.1f}): {verdict} the "
          f"64 MiB target. Flow verdicts: {m['verdicts']}. The datapath's transit and "
          f"reverse maps have {m['transit_table_bytes'] / 2**20:.1f} MiB of slots "
          f"({m['transit_table_bytes'] / m['mapping_count']:.0f} B/mapping). Each row is "
          "taken as the node's sweep task leaves it every 5 s (release_freed_memory: "
          "malloc_trim); the registrations write a snapshot of every mapping every 2,000, as "
          "the node's persist task does.")
    print(f"Connector FlowTable({ft['capacity']:,}): {ft['entry_bytes']} B per flow entry, "
          f"{ft['event_bytes']} B per event record (a ring of {ft['ring_size']:,}), "
          f"{ft['buckets']:,} hash buckets of 4 B; {ft['entries_used']:,} entries ever used. "
          "Entries and ring come zeroed from mmap and only the pages used become resident, so "
          "an empty node holds the buckets only; the ring restarts at its start whenever a "
          "drain empties it, so a control plane that keeps up touches only its first pages.")
    print("Modules the bench process loaded beyond those of `conn25d up`: "
          f"{', '.join(m['bench_modules']) or 'none'}.")
    if daemon:
        print("Real `conn25d up --advertise-connector` in the testbed, VmRSS: "
              + ", ".join(f"{k.replace('_', ' ')} {mib(v):.1f} MiB" for k, v in daemon.items())
              + ".")
    print()


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT", help="also write {figure: {variant: value}} here")
    ap.add_argument("--seconds", type=float, default=5, help="length of each figure (default 5)")
    ap.add_argument("--concurrency", type=int, default=4,
                    help="registration requests in flight (default 4)")
    ap.add_argument("--log-level", default="info",
                    help="the daemons' --log-level (default info, conn25d's own default)")
    ap.add_argument("--_post-load", nargs=2, metavar=("SECONDS", "CONCURRENCY"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._post_load:
        print(json.dumps(post_load(float(args._post_load[0]), int(args._post_load[1]))))
        return 0
    if args._memory:  # the memory section alone (no root needed)
        print_memory(run_memory(), None)
        return 0
    if (why := need_root()) is not None:
        print(f"bench/control.py {why}", file=sys.stderr)
        return 2
    if shutil.which("dnsperf") is None:
        print("bench/control.py needs dnsperf (./install.sh --dev installs it)", file=sys.stderr)
        return 2

    load = os.getloadavg()[0]  # a shared machine: say how busy it was
    memory = run_memory()
    regs = bench_handler(args.seconds)
    with tempfile.TemporaryDirectory(prefix="conn25-control-") as tmp:
        workdir = Path(tmp)
        with client_and_connector(workdir, args.log_level) as bed:
            dns = dns_figures(bed, workdir, args.seconds)
            http_rows, daemon_rss = registration_figures(bed, workdir, args.seconds,
                                                         args.concurrency, args.log_level)
    regs += http_rows

    print(f"# control-plane benchmark — {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.python_implementation()} {platform.python_version()}, daemons at "
          f"--log-level {args.log_level}; load average {load:.2f} at the start\n")
    print_dns(dns, args.seconds)
    print_registrations(regs, args.seconds, args.concurrency)
    print_memory(memory, daemon_rss)

    if args.json:
        def key(r: dict[str, Any]) -> str:
            what = "app_cached" if r["name"] == APP_NAME else "non_app"
            return what if r["server"] == "conn25d" else f"{what}_upstream_direct"

        figures = {
            "dns_qps": {key(r): r["loaded"]["qps"] for r in dns},
            "dns_p99_ms": {key(r): r["loaded"]["p99"] for r in dns},
            "dns_p99_ms_one_outstanding": {key(r): r["single"]["p99"] for r in dns},
            "registrations_per_s": {r["key"]: r["ok_per_s"] for r in regs},
            "memory_mib": {"interpreter": mib(memory["interpreter"]["VmRSS"]),
                           "empty_node": mib(memory["empty"]["VmRSS"]),
                           "mappings_100k": mib(memory["mappings"]["VmRSS"]),
                           "mappings_100k_flows_100k": mib(memory["flows"]["VmRSS"]),
                           **{f"daemon_{k}": mib(v) for k, v in daemon_rss.items()}},
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
