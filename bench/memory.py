"""The connector memory figure of bench/control.py, in a process of its own.

    python bench/memory.py TAILNET_FILE HOSTNAME PRIVATE_KEY_FILE   (prints JSON)

The process holds what `conn25d up --advertise-connector` holds and nothing
else: it imports the modules `conn25d up` imports (conn25.daemon.cli and
conn25.daemon.node; the bench's own code uses only modules those load, which
"bench_modules" in the output lists, so the interpreter row is the node's),
then builds a connector's state as Node.run does: its configuration from the
tailnet file and key file, the ConnectorTable, Datapath(client=True,
connector=True), the Dataplane's tables, the Overlay's peers. It fills that
with 100,000 mappings (two peers) and 100,000 flows created by
Datapath.process_datagram, and reports VmRSS after each step. The pump
threads and the trio loop are not run (the flows come in through
process_datagram).
"""

from __future__ import annotations

import sys

BASE_MODULES = set(sys.modules)

import conn25.daemon.cli  # noqa: E402  (`conn25d up` is cli -> node)
import conn25.daemon.node  # noqa: E402, F401

NODE_MODULES = set(sys.modules)

import gc  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from conn25.core import dnsname, peerapi, policy  # noqa: E402
from conn25.core.connector import ConnectorTable  # noqa: E402
from conn25.core.iprange import make_address  # noqa: E402
from conn25.core.peerapi import ConnectorTransitIPRequest, TransitIPRequest  # noqa: E402
from conn25.core.wireguard import transport  # noqa: E402
from conn25.core.wireguard.handshake import Keypair  # noqa: E402
from conn25.daemon import keyfile  # noqa: E402
from conn25.daemon.dataplane import Dataplane, Ids  # noqa: E402
from conn25.daemon.overlay import Overlay  # noqa: E402
from conn25.daemon.refusals import RefusalLog  # noqa: E402
from conn25.daemon.system import release_freed_memory, replace_file  # noqa: E402
from conn25.daemon.tailnetfile import load_file  # noqa: E402
from conn25.fastpath import Datapath, internet_checksum, monotonic_ms  # noqa: E402

ITEMS = 100_000  # mappings and flows
BATCH = 100  # registration items per request
SNAPSHOT_EVERY = 20  # requests (2,000 mappings: 0.2 s of registrations at 10,000/s)
APP_DOMAIN = "example.com"  # a domain of the testbed's app


def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, ... of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


def ipv4_udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    payload = b"conn25-b"
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no UDP checksum
    head = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                                 ipaddress.IPv4Address(src).packed,
                                 ipaddress.IPv4Address(dst).packed))
    head[10:12] = internet_checksum(bytes(head)).to_bytes(2, "big")
    return bytes(head) + udp


def _first_range(ipset: Any, n: int) -> int:
    """The first address (int) of the set's first range, which must hold `n` addresses."""
    r = next(iter(ipset))
    if r.last - r.first + 1 < n:
        raise ValueError(f"the pool's first range {r} holds fewer than {n} addresses")
    return r.first


def settle() -> None:
    """What the node's sweep task does every 5 s (Node._sweep ends with
    release_freed_memory): each figure is the node's a few seconds after the step."""
    gc.collect()
    release_freed_memory()


def memory_figures(tailnet_path: str, hostname: str, key_path: str) -> dict[str, Any]:
    """RSS of a connector node's state, empty and with 100k mappings + 100k flows."""
    state = Path(key_path).parent  # a state dir of the bench's own
    gc.collect()
    out: dict[str, Any] = {"interpreter": proc_status(),
                           "node_modules": len(NODE_MODULES - BASE_MODULES),
                           "bench_modules": sorted(set(sys.modules) - NODE_MODULES)}

    # As Node.run: configuration, key, tables, overlay.
    cfg = policy.node_config(load_file(tailnet_path), hostname, True)
    private, _ = keyfile.node_key(Path(key_path), tailnet_path, hostname)
    app = cfg.own_apps[0].name
    dp = Datapath(client=True, connector=True)
    ids = Ids()
    dataplane = Dataplane(dp.tables, ids)
    # The limit is not what is measured; the mappings go where the node keeps them.
    table = ConnectorTable(cfg, rate=1e12, burst=1 << 40, store=dataplane.connector_store)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    overlay = Overlay(dp, sock, private, ids.peer, RefusalLog(logging.getLogger("bench")))
    dataplane.install_config(cfg)
    overlay.configure(cfg)
    # Two peers (alice's client, bob's peer), so that 100,000 mappings fit their transit
    # pools (32k v4 + 64k v6 each).
    peers = [n for n in cfg.peers if cfg.may_use_apps(n)]
    assert len(peers) == 2, [p.name for p in peers]
    # Each peer has a session (fixed keys, as a handshake would leave them); the bench plays
    # the peers with the reference transport, so the flows' datagrams are sealed ones.
    sessions: dict[int, Keypair] = {}
    for p in peers:
        pid = ids.peer(p.name)
        key_out, key_in = bytes([pid]) * 32, bytes([100 + pid]) * 32
        dp.install_keypair(pid, local_index=pid, remote_index=100 + pid, send_key=key_out,
                           receive_key=key_in, initiator=False, created_ms=monotonic_ms(),
                           as_next=False)
        sessions[pid] = Keypair(key_in, key_out, 100 + pid, pid, 0.0, True)
    settle()
    out["empty"] = proc_status()

    # Each peer maps half its items per family; both peers reach the same destinations.
    # Addresses are made as they are used, so that the bench's own lists stay out of RSS.
    pools = cfg.pools
    per_family = ITEMS // len(peers) // 2
    v4t, v6t = (_first_range(pools.v4_transit, per_family),
                _first_range(pools.v6_transit, per_family))
    d4, d6 = int(ipaddress.ip_address("198.18.0.0")), int(ipaddress.ip_address("2001:db8:200::"))

    def transit(i: int) -> str:
        return str(make_address(4, v4t + i) if i < per_family
                   else make_address(6, v6t + i - per_family))

    def dest(i: int) -> str:
        return str(make_address(4, d4 + i) if i < per_family
                   else make_address(6, d6 + i - per_family))

    now = time.time()
    domain = dnsname.normalize(APP_DOMAIN)
    for start in range(0, 2 * per_family, BATCH):  # as answers come: one per query
        table.note_resolution(app, domain, [(ipaddress.ip_address(dest(i)), 3600)
                                            for i in range(start, start + BATCH)], now)
    settle()
    out["resolutions"] = proc_status()
    out["resolution_count"] = table.resolutions

    # As the peer API does: one request at a time (register puts the mappings into the
    # datapath's transit table, the table's store); what it returns is dropped. As the
    # node's persist task does: a snapshot of every mapping after each burst (the node
    # writes one 0.2 s after a change; here after every SNAPSHOT_EVERY requests).
    requests = 0
    for p in peers:
        for start in range(0, 2 * per_family, BATCH):
            req = ConnectorTransitIPRequest([TransitIPRequest(transit(i), dest(i), app,
                                                              APP_DOMAIN)
                                             for i in range(start, start + BATCH)])
            resp, new = table.register(p, req, now)
            assert all(r.code == peerapi.Code.OK for r in resp.transit_ips), resp
            assert len(new) == BATCH
            requests += 1
            if requests % SNAPSHOT_EVERY == 0:  # as Node._save_assignments writes it
                replace_file(state / "connector.json", table.snapshot_chunks())
    del req, resp, new
    settle()
    out["mappings"] = proc_status()
    out["mapping_count"] = len(table)
    mem = dp.tables.memory()
    out["transit_table_bytes"] = mem["transit_bytes"] + mem["real_rev_bytes"]

    # 100,000 distinct 5-tuples: each peer, each of its v4 mappings, two source ports.
    verdicts: Counter[str] = Counter()
    now_ms = monotonic_ms()
    n = 0
    for p in peers:
        pid = ids.peer(p.name)
        # Where it sends from does not matter (roaming); a documentation address if it has none.
        src, sender = str(p.address(4)), p.endpoint or ("192.0.2.200", 41641)
        for sport in range(40000, 40000 + ITEMS // len(peers) // per_family):
            for i in range(per_family):
                dgram = transport.seal(sessions[pid], n, transport.pad(
                    ipv4_udp(src, transit(i), sport, 443)))
                verdicts[dp.process_datagram(dgram, sender, now_ms)[0]] += 1
                n += 1
                if n % 1000 == 0:
                    dp.read_events()  # the daemon drains its events as they come
    dp.read_events()
    settle()
    out["flows"] = proc_status()
    out["flow_count"] = dp.connector_flows.stats()["flows"]
    out["flowtable"] = dp.connector_flows.memory()
    out["verdicts"] = dict(verdicts)
    sock.close()
    return out


if __name__ == "__main__":
    print(json.dumps(memory_figures(*sys.argv[1:4])))
