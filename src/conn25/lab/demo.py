"""`conn25d demo`: a whole tailnet on one machine, in throwaway network namespaces.

A client and a connector run the real `conn25d up`; an "internet" namespace holds a
DNS server (dnsmasq) and a web server that says which address it saw. The demo
resolves an app domain on the client, fetches a page through the connector, prints
what happened, and removes everything it made.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from .netns import need_root
from .testbed import DNS4, WEB4, NodeSpec, Testbed

NODES = (
    NodeSpec("client", 1, user="alice@example.com"),
    NodeSpec("conn1", 2, tags=("tag:example-connector",), connector=True),
)


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo() -> int:
    if (why := need_root()) is not None:
        print(f"conn25d demo {why} (it creates network namespaces and TUN devices)",
              file=sys.stderr)
        return 1
    missing = [tool for tool in ("ip", "dnsmasq", "curl", "nft", "iperf3")
               if shutil.which(tool) is None]
    if missing:
        print(f"conn25d demo needs {', '.join(missing)}: run ./install.sh", file=sys.stderr)
        return 1
    client, conn = NODES
    with tempfile.TemporaryDirectory(prefix="conn25d-demo-") as tmp:
        _say("conn25d demo: building a throwaway tailnet in network namespaces")
        with Testbed(Path(tmp), NODES) as bed:
            _say(f"  internet  DNS {DNS4} (dnsmasq), web server {WEB4}")
            _say(f"  {client.name:<9} overlay {client.overlay4}, underlay {client.endpoint}")
            _say(f"  {conn.name:<9} connector for app Example (example.com, *.example.com), "
                 f"egress {conn.link4}")
            bed.start(conn.name)
            bed.start(client.name)
            _say("  both nodes are up (conn25d up); the client's resolv.conf now points at its "
                 "conn25d (--accept-dns), until it stops\n")

            r = bed.run(client.name, sys.executable, "-c",
                        "import socket; print(socket.gethostbyname('example.com'))")
            if r.returncode != 0:
                _say(f"resolving example.com failed:\n{r.stderr}\n{bed.log(client.name)[-2000:]}")
                return 1
            magic = r.stdout.strip()
            _say(f"[1] the client resolves example.com -> {magic}   (a magic IP: its own, "
                 "not the real address)")
            doc = bed.status(client.name) or {}
            a = next((a for app in doc.get("client", {}).get("apps", [])
                      for d in app["domains"] for a in d["addresses"] if a["magic"] == magic), None)
            if a is not None:
                _say(f"[2] before answering, it agreed transit IP {a['transit']} -> real "
                     f"{a['real']} with connector {a['connector']}")
            peer = next((p for p in doc.get("peers", []) if p["name"] == conn.name), None)
            if peer is not None and peer.get("latestHandshake"):
                ago = max(0.0, float(doc.get("now", 0.0)) - peer["latestHandshake"])
                _say(f"    over WireGuard: {client.name} and {peer['name']} (public key "
                     f"{peer['publicKey'][:10]}...) handshook {ago:.1f}s ago; endpoint "
                     f"{peer['endpoint']}, {peer['rxBytes']} bytes in, {peer['txBytes']} out")
            page = bed.curl(client.name, "http://example.com/")
            if page.returncode != 0:
                _say(f"fetching http://example.com/ failed: {page.stderr}")
                return 1
            seen = page.stdout.strip().removeprefix("you came from ")
            _say(f"[3] the client fetches http://example.com/: the web server saw {seen}   "
                 f"({'the connector' if seen == conn.link4 else '?'}'s egress address)")
            direct = bed.curl(client.name, "http://direct.example.net/")
            _say(f"[4] a name of no app, http://direct.example.net/, goes direct: the server saw "
                 f"{direct.stdout.strip().removeprefix('you came from ')}   (the client itself)")
            _say("\nremoving the namespaces, devices and processes...")
        _say("done: nothing is left behind")
    return 0
