"""The status document (``conn25d status``, the local API's ``/status``).

:func:`status_document` is a pure function of the node's state, read through
:class:`StatusSource` (nothing else of the node), and returns plain JSON types.
A node without apps gives only the overlay (a node without apps of its own still
has peers, e.g. a connector)::

    {"configured": false, "now": SECONDS, "publicKey": KEY, "peers": [PEER, ...]}

otherwise::

    {"configured": true, "node": NAME, "now": SECONDS, "advertiseConnector": BOOL,
     "publicKey": KEY, "peers": [PEER, ...],
     "client": {
        "apps": [{"name", "connector": NAME|null, "candidates": [{"name", "healthy"}],
                  "domains": [{"domain", "addresses": [ADDRESS, ...]}, ...]}, ...],
        "pools": {"v4Magic": {"inUse", "capacity"}, "v6Magic": ..., "v4Transit": ...,
                  "v6Transit": ...}},
     "connector": {"configured", "apps", "peers": [{"name", "apps",
                   "mappings": [{"transit", "destination", "app", "expires"}]}]},
     "connectorHealth": {NAME: {"reachable", "advertisesConnector", "apps", ...}},
     "dns": {"mode": "off"|"resolv.conf"|"systemd-resolved", "path": FILE (resolv.conf),
             "server": IP (what the system's DNS points at, unless off)},
     "tunOffload": MODE, "tunQueues": INT, "datapath": {COUNTER: INT},
     "datapathQueues": [{"tun_rx", "udp_tx", "udp_rx", "tun_tx"}, ...],
     "metrics": {COUNTER: INT}}

where MODE is the TUN's offload mode ("off", "tso", "tso+uso": which
super-packets the kernel hands the datapath to split), tunQueues the TUN's queues
(one pair of pump threads each) and datapathQueues what each queue's pumps moved
(Datapath.queue_counters), ADDRESS is ``{"magic",
"transit", "real", "app", "domain", "expiry", "activeFlows", "connector"}``,
KEY is a WireGuard public key in its base64
text form, and PEER is the overlay's view of one WireGuard peer, like a peer
of ``wg show``::

    {"name", "publicKey": KEY, "endpoint": "IP:PORT"|null,
     "endpointLearned": SECONDS|null (null: the configured endpoint),
     "latestHandshake": SECONDS|null (null: never), "handshaking": BOOL,
     "rxBytes", "txBytes", "staged", "drops": {REASON: INT}}

Only these fields are copied from the overlay, so nothing it might add later
(key material above all: the private key never appears in status) reaches the
document unreviewed.

Times (``now``, ``expiry``, ``expires``, ``endpointLearned``,
``latestHandshake``) are wall-clock seconds since the epoch (floats), the time
base of assignments and connector mappings; ``expiry - now`` is what is left,
negative for an expired assignment that is still in use.

Order: apps by name; domains parents before children (compared label
by label from the top: ``github.com.`` < ``api.github.com.`` <
``gist.github.com.``); addresses by active flows, most first, then by real
address (IPv4 before IPv6); peers by name. The client view lists the apps
this node maps (not those it serves as a connector), plus any app that still
has assignments after a reload removed it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from ..core.assignments import Assignment, Assignments
from ..core.config import App, Member, NodeConfig
from ..core.connector import ConnectorTable
from ..core.wireguard import keys

__all__ = ["OverlayPeers", "StatusSource", "domain_order", "render_table", "status_document"]


class ConnectorChoice(Protocol):
    """What status shows of the registrar: its connector choice and health checks."""

    def chosen_connector(self, app: App) -> Member | None: ...

    def health_of(self, name: str, app: App) -> bool | None: ...

    def health(self) -> dict[str, dict[str, Any]]: ...


class Counted(Protocol):
    """What status shows of the datapath: its counters."""

    def counters(self) -> Mapping[str, int]: ...

    def queue_counters(self) -> Sequence[Mapping[str, int]]: ...


class OverlayPeers(Protocol):
    """What status shows of the WireGuard overlay: this node's public key and its peers
    (``conn25.daemon.overlay.Overlay``; see PEER in the module docstring)."""

    @property
    def public_key(self) -> bytes: ...

    def peers(self) -> list[dict[str, Any]]: ...


class StatusSource(Protocol):
    """What the status document reads of the node."""

    config: NodeConfig
    assignments: Assignments
    connector: ConnectorTable | None
    tun_offload: str
    tun_queues: int

    # Read-only (properties), so the node's richer Registrar and Datapath fit these.
    @property
    def registrar(self) -> ConnectorChoice: ...

    @property
    def datapath(self) -> Counted: ...

    @property
    def overlay(self) -> OverlayPeers: ...

    def now(self) -> float: ...

    def metrics(self) -> dict[str, int]: ...

    def dns_status(self) -> dict[str, Any]:
        """How the system's DNS reaches the node (--accept-dns)."""
        ...


def domain_order(domain: str) -> tuple[str, ...]:
    """Sort key putting a parent before its children, siblings by name."""
    return tuple(reversed(domain.rstrip(".").split(".")))


def _address(a: Assignment) -> dict[str, Any]:
    return {
        "magic": str(a.magic),
        "transit": str(a.transit),
        "real": str(a.real),
        "app": a.app,
        "domain": a.domain,
        "expiry": a.expiry,
        "activeFlows": a.active_flows,
        "connector": a.connector,
    }


def _domains(assignments: Iterable[Assignment]) -> list[dict[str, Any]]:
    by_domain: dict[str, list[Assignment]] = {}
    for a in assignments:
        by_domain.setdefault(a.domain, []).append(a)
    return [
        {
            "domain": domain,
            "addresses": [
                _address(a)
                for a in sorted(by_domain[domain],
                                key=lambda a: (-a.active_flows, a.real.version, int(a.real)))
            ],
        }
        for domain in sorted(by_domain, key=domain_order)
    ]


def _client_view(node: StatusSource) -> dict[str, Any]:
    cfg = node.config
    registrar = node.registrar
    by_app: dict[str, list[Assignment]] = {a.name: [] for a in cfg.apps if not cfg.serves(a)}
    for a in node.assignments:
        by_app.setdefault(a.app, []).append(a)
    apps = []
    for name in sorted(by_app):
        app = cfg.app(name)  # None for an app a reload removed
        chosen = registrar.chosen_connector(app) if app is not None else None
        candidates = [] if app is None else [
            {"name": c.name, "healthy": registrar.health_of(c.name, app)}
            for c in cfg.connector_candidates(app)
        ]
        apps.append({
            "name": name,
            "connector": chosen.name if chosen is not None else None,
            "candidates": candidates,
            "domains": _domains(by_app[name]),
        })
    return {"apps": apps, "pools": node.assignments.pool_usage()}


def _peer(p: Mapping[str, Any]) -> dict[str, Any]:
    # A whitelist, not a copy: see the module docstring.
    return {
        "name": p["name"],
        "publicKey": p["publicKey"],
        "endpoint": p.get("endpoint"),
        "endpointLearned": p.get("endpointLearned"),
        "latestHandshake": p.get("latestHandshake"),
        "handshaking": bool(p.get("handshaking", False)),
        "rxBytes": int(p.get("rxBytes", 0)),
        "txBytes": int(p.get("txBytes", 0)),
        "staged": int(p.get("staged", 0)),
        "drops": {str(k): int(v) for k, v in p.get("drops", {}).items()},
    }


def _overlay_view(node: StatusSource) -> dict[str, Any]:
    overlay = node.overlay
    return {
        "publicKey": keys.encode(overlay.public_key),
        "peers": sorted((_peer(p) for p in overlay.peers()), key=lambda p: p["name"]),
    }


def status_document(node: StatusSource) -> dict[str, Any]:
    """The node's state as plain JSON types (see the module docstring)."""
    cfg = node.config
    if not cfg.configured:
        return {"configured": False, "now": node.now(), **_overlay_view(node)}
    connector = node.connector
    return {
        "configured": True,
        "node": cfg.node.name,
        "now": node.now(),
        "advertiseConnector": cfg.advertise_connector,
        **_overlay_view(node),
        "client": _client_view(node),
        "connector": msgspec.to_builtins(connector.state()) if connector is not None
        else {"configured": False},
        "connectorHealth": node.registrar.health(),
        "dns": node.dns_status(),
        "tunOffload": node.tun_offload,
        "tunQueues": node.tun_queues,
        "datapath": dict(node.datapath.counters()),
        "datapathQueues": [dict(q) for q in node.datapath.queue_counters()],
        "metrics": dict(node.metrics()),
    }


# -- the text table -------------------------------------------------------------------


def _span(seconds: float) -> str:
    s = int(abs(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _duration(seconds: float) -> str:
    text = _span(seconds)
    return f"in {text}" if seconds >= 0 else f"expired {text} ago"


def _ago(then: float, now: float) -> str:
    # A time a little ahead of ``now`` (the two clocks were read at different moments)
    # is "0s ago", not a time in the future.
    return f"{_span(max(0.0, now - then))} ago"


_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def _bytes(n: int) -> str:
    """Binary units as ``wg show`` uses them, to about three significant digits."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def _peer_row(p: dict[str, Any], now: float) -> list[str]:
    endpoint = p.get("endpoint")
    learned = p.get("endpointLearned")
    if endpoint is None:
        where = "(none)"
    elif learned is None:
        where = f"{endpoint} (configured)"
    else:
        where = f"{endpoint} (learned {_ago(learned, now)})"
    handshake = p.get("latestHandshake")
    notes = []
    drops = {k: v for k, v in sorted(p.get("drops", {}).items()) if v}
    if drops:
        notes.append("drops: " + ", ".join(f"{k} {v}" for k, v in drops.items()))
    if p.get("handshaking"):
        notes.append("handshaking")
    return [
        p.get("name", "?"), p.get("publicKey", "?"), where,
        "never" if handshake is None else _ago(handshake, now),
        f"{_bytes(p.get('rxBytes', 0))} received, {_bytes(p.get('txBytes', 0))} sent",
        "; ".join(notes),
    ]


def _peers(doc: dict[str, Any], now: float) -> list[str]:
    if "peers" not in doc:  # a document from before the overlay was WireGuard
        return []
    out = [f"peers (this node's public key: {doc.get('publicKey', '?')})"]
    rows = [_peer_row(p, now) for p in doc["peers"]]
    if rows:
        out += _table(["PEER", "PUBLIC KEY", "ENDPOINT", "LATEST HANDSHAKE", "TRANSFER", "NOTES"],
                      rows)
    else:
        out.append("  no peers")
    return [*out, ""]


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]


def _counters(title: str, counters: dict[str, Any]) -> list[str]:
    if not counters:
        return []
    width = max(len(k) for k in counters)
    return [title, *(f"  {k.ljust(width)}  {v}" for k, v in sorted(counters.items()))]


def _dns_line(dns: dict[str, Any]) -> str:
    mode = dns.get("mode", "off")
    if mode == "resolv.conf":
        return f"dns: {dns.get('path')} points at {dns.get('server')} (--accept-dns)"
    if mode == "systemd-resolved":
        return f"dns: systemd-resolved sends app names to {dns.get('server')} (--accept-dns)"
    return "dns: the system's DNS is left alone (--accept-dns=false)"


def render_table(doc: dict[str, Any]) -> str:
    """``doc`` (from :func:`status_document`) as readable text for a terminal."""
    now = float(doc.get("now", 0.0))
    if not doc.get("configured"):
        out = ["not configured: this node has no apps in the tailnet file", "",
               *_peers(doc, now)]
        return "\n".join(out).rstrip("\n") + "\n"
    role = "client and connector" if doc.get("advertiseConnector") else "client"
    out = [f"node {doc.get('node', '?')} ({role})", _dns_line(doc.get("dns", {})), ""]
    client = doc.get("client", {})
    for app in client.get("apps", []):
        health = {True: "healthy", False: "down", None: "unknown"}
        candidates = ", ".join(f"{c['name']} {health.get(c.get('healthy'), '?')}"
                               for c in app.get("candidates", [])) or "none"
        out.append(f"app {app['name']}: connector {app.get('connector') or '-'} "
                   f"(candidates: {candidates})")
        rows = [
            [d["domain"], a["magic"], a["transit"], a["real"], str(a["activeFlows"]),
             _duration(a["expiry"] - now), a.get("connector") or "(unregistered)"]
            for d in app.get("domains", []) for a in d["addresses"]
        ]
        if rows:
            out += _table(["DOMAIN", "MAGIC", "TRANSIT", "REAL", "FLOWS", "EXPIRES", "CONNECTOR"],
                          rows)
        else:
            out.append("  no assignments")
        out.append("")
    pools = client.get("pools", {})
    if pools:
        out.append("pools")
        out += _table(["POOL", "IN USE", "CAPACITY"],
                      [[name, str(p["inUse"]), str(p["capacity"])]
                       for name, p in sorted(pools.items())])
        out.append("")
    conn = doc.get("connector", {})
    if conn.get("configured"):
        out.append(f"connector for {', '.join(conn.get('apps', []))}")
        rows = [
            [peer["name"], m["app"], m["transit"], m["destination"], _duration(m["expires"] - now)]
            for peer in conn.get("peers", []) for m in peer.get("mappings", [])
        ]
        if rows:
            out += _table(["PEER", "APP", "TRANSIT", "DESTINATION", "EXPIRES"], rows)
        else:
            out.append("  no mappings")
        out.append("")
    out += _peers(doc, now)
    queues = doc.get("tunQueues", 1)
    out += _counters(f"datapath (TUN offload: {doc.get('tunOffload', 'off')}"
                     + (f", {queues} queues)" if queues > 1 else ")"),
                     doc.get("datapath", {}))
    if queues > 1:
        out += ["", *_table(["QUEUE", "TUN RX", "UDP TX", "UDP RX", "TUN TX"],
                            [[str(k), *(str(q.get(c, 0)) for c in
                                        ("tun_rx", "udp_tx", "udp_rx", "tun_tx"))]
                             for k, q in enumerate(doc.get("datapathQueues", []))])]
    metrics = doc.get("metrics", {})
    if metrics:
        out += ["", *_counters("control plane", metrics)]
    return "\n".join(out).rstrip("\n") + "\n"
