"""A conn25d node: the trio shell that wires the core, the datapath and the system.

Embeddable::

    node = Node(NodeOptions(tailnet="tailnet.hujson", hostname="laptop"))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)   # returns once the node serves
        ...
        nursery.cancel_scope.cancel()   # tears everything down, leaves nothing behind

``conn25d up`` is :func:`serve`: this plus signal handling and, under systemd, the
service manager's notifications.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from ..core import dnsconfig, policy
from ..core import tailnet as tailnet_mod
from ..core.assignments import Assignment, Assignments
from ..core.config import DEFAULT_PORT, NodeConfig, Tailnet
from ..core.connector import ConnectorTable, Mapping
from ..core.dnsmap import DNSMapper
from ..core.iprange import IPAddress, IPNetwork
from ..fastpath import Datapath, EventKind, Role, monotonic_ms
from . import keyfile
from .accept_dns import RESOLV_CONF, AcceptDNS
from .dataplane import Dataplane, Ids
from .dns_forwarder import Forwarder
from .localapi import LocalAPI, peer_metrics
from .loglater import LaterLog
from .overlay import Overlay
from .peerapi_server import PEERAPI_LIMITS, PeerAPI
from .peerapi_server import REFUSAL_REASONS as PEERAPI_REFUSAL_REASONS
from .refusals import RefusalLog
from .registration import Registrar
from .sdnotify import Notifier
from .status import status_document
from .system import (
    SystemSetup,
    SystemSetupError,
    release_freed_memory,
    replace_file,
)
from .tailnetfile import load_file

if TYPE_CHECKING:  # a client's alone: imported when the node has apps to map
    from .dns_resolver import ClientResolver
    from .dns_server import DNSServer

log = logging.getLogger("conn25d")

PERSIST_DEBOUNCE = 0.2  # seconds from a change to the state files' write, at least
# Connector mappings up to this many are saved as one piece (~100 bytes each), written in
# a worker thread; more are streamed from the table in pieces, in the event loop.
SNAPSHOT_IN_THREAD = 4096

PEERAPI_PORT = 41642
STATE_ROOT = Path("/var/lib/conn25d")  # a node's state dir is STATE_ROOT/HOSTNAME by default
SOCKET_NAME = "conn25d.sock"
ASSIGNMENTS_FILE = "assignments.json"
CONNECTOR_FILE = "connector.json"
FLOWS_FILE = "flows.bin"
SWEEP_INTERVAL = 5.0
REFUSAL_FLUSH_INTERVAL = 5.0
# Refusals an attacker can cause per packet, item or connection: counted by reason
# (``refusals_<reason>`` in metrics, present from the start) and logged as summaries.
REFUSAL_REASONS = (
    "reject_received", "unmapped_transit", "dns_source", "dns_tcp_per_source",
    "handshake_rejected",
    *PEERAPI_REFUSAL_REASONS,
    *(f"peerapi_{r}" for r in ("not_peer", "connections_per_source", "rate_limited", "busy",
                                "bad_requests")),
)
RELOAD_POLL = 1.0
# /metrics values that are levels, not counts.
GAUGES = (
    "datapath_client_flows", "datapath_connector_flows", "assignments", "connector_mappings",
    *(f"pool_v{v}{kind}_{what}" for v in (4, 6) for kind in ("Magic", "Transit")
      for what in ("in_use", "capacity")),
)


class NodeError(Exception):
    """The node cannot start: a message for the operator, no traceback."""


class NodeOptions(msgspec.Struct, kw_only=True):
    tailnet: str
    hostname: str
    advertise_connector: bool = False
    advertise_tags: tuple[str, ...] | None = None
    state_dir: str | None = None  # default STATE_ROOT/HOSTNAME
    tun_name: str = "conn25"
    mtu: int = 1420
    tun_offload: bool = True  # TSO/USO super-packets read from the TUN (SystemSetup)
    tun_queues: int = 1  # TUN queues, one pump pair and one overlay socket each
    dns_listen: tuple[str, int] = ("100.100.100.100", 53)
    upstream_dns: tuple[tuple[str, int], ...] | None = None  # default: from /etc/resolv.conf
    dns_allow: tuple[str, ...] = ()  # CIDRs besides this host whose DNS queries are answered
    peerapi_port: int = PEERAPI_PORT
    private_key: str | None = None  # the WireGuard private key file; default STATE_DIR/private.key
    # Point the system's DNS at the node's DNS server while it runs (None: when the node
    # sees apps, as `conn25d up` does). Off by default for an embedding program.
    accept_dns: bool | None = False
    resolv_conf: str = RESOLV_CONF  # the file --accept-dns manages (and reads upstreams from)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else STATE_ROOT / self.hostname

    @property
    def private_key_path(self) -> Path:
        return Path(self.private_key) if self.private_key else self.state_path / "private.key"


class Node:
    """One node; ``run`` serves until cancelled.

    It is what its components are given, and implements the interfaces they
    declare: ``registration.RegistrarNode``, ``peerapi_server.PeerAPINode``
    and ``status.StatusSource``.
    """

    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.peerapi_port = options.peerapi_port
        self.tailnet: Tailnet | None = None
        self.config: NodeConfig
        self.assignments: Assignments
        self.connector: ConnectorTable | None = None
        self.datapath: Datapath
        self.dataplane: Dataplane  # every write to the datapath's tables goes through it
        self.overlay: Overlay  # the WireGuard handshakes and timers
        self.tun_offload = "off"  # what the kernel accepted (tun.set_offload), once open
        self.tun_queues = options.tun_queues
        self.forwarder: Forwarder
        self.registrar: Registrar
        self.resolver: ClientResolver | None = None
        self.dns_server: DNSServer | None = None
        self.dns_config: AcceptDNS
        self.ids = Ids()
        self._dirty = trio.Event()
        self._reload_requested = trio.Event()
        self._reload_done = trio.Event()  # set once the pending request has been handled
        self._file_stamp: tuple[float, int] | None = None
        self._saved_flows = b""
        self._assignments_saved = False  # the file holds the last snapshot taken
        self.counters: dict[str, int] = {"reloads": 0, "reload_errors": 0, "reclaimed": 0}
        self.refusals = RefusalLog(logging.getLogger("conn25d.refusals"))
        self.later_log = LaterLog()  # lines a reply need not wait for

    # -- what the components use ------------------------------------------------

    def now(self) -> float:
        return time.time()

    def install_connector_mappings(self, mappings: Iterable[Mapping]) -> None:
        # ConnectorTable.register put them into the datapath's transit table (its store).
        for m in mappings:  # after the peer's response went out
            self.later_log.log(log, logging.INFO, "mapped app=%s peer=%s transit=%s -> %s",
                               m.app, m.peer_name, m.transit, m.destination)
        self._dirty.set()

    def assignments_changed(self) -> None:
        self._dirty.set()

    def metrics(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.resolver is not None:
            out.update({f"dns_{k}": v for k, v in self.resolver.counters().items()})
        if self.dns_server is not None:
            out.update({f"dns_server_{k}": v for k, v in self.dns_server.counters().items()})
        forwarder = getattr(self, "forwarder", None)  # made once run() read the options
        if forwarder is not None:
            out.update({f"dns_forwarder_{k}": v for k, v in forwarder.counters().items()})
        out.update({f"registration_{k}": v for k, v in self.registrar.counters().items()})
        overlay = getattr(self, "overlay", None)  # made once run() bound the overlay's socket
        if overlay is not None:
            out.update({f"wireguard_{k}": v for k, v in overlay.counters.items()})
        refusals = dict.fromkeys(REFUSAL_REASONS, 0) | dict(self.refusals.counters)
        out.update({f"refusals_{k}": v for k, v in refusals.items()})
        return out

    def _exported_metrics(self) -> dict[str, int]:
        """Control-plane and datapath counters plus pool use, for /metrics."""
        out = self.metrics()
        out.update({f"datapath_{k}": v for k, v in self.datapath.counters().items()})
        for pool, use in self.assignments.pool_usage().items():
            out[f"pool_{pool}_in_use"] = use["inUse"]
            out[f"pool_{pool}_capacity"] = use["capacity"]
        if self.connector is not None:
            out["connector_mappings"] = len(self.connector)
        out["assignments"] = len(self.assignments)
        return out

    def dns_status(self) -> dict[str, Any]:
        return self.dns_config.status()

    def request_reload(self) -> None:
        """Re-read the tailnet file soon (SIGHUP)."""
        self._reload_requested.set()

    async def reload(self) -> None:
        """Re-read the tailnet file; returns once it has been applied or rejected."""
        done = self._reload_done
        self._reload_requested.set()
        await done.wait()

    # -- life cycle --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        opts = self.options
        self._load_config()
        dns_allow = self._dns_allow()
        state = opts.state_path
        state.mkdir(parents=True, exist_ok=True)
        self.assignments = Assignments(self.config.pools, on_reclaim=self._forget)
        self._restore_assignments()
        self.datapath = Datapath(client=True, connector=opts.advertise_connector)
        self.dataplane = Dataplane(self.datapath.tables, self.ids)
        # Its mappings live in the datapath's transit table only.
        self.connector = (ConnectorTable(self.config, store=self.dataplane.connector_store)
                          if opts.advertise_connector else None)
        upstreams = self._prepare_dns()
        self.forwarder = Forwarder(list(opts.upstream_dns) if opts.upstream_dns is not None
                                   else upstreams)
        self.registrar = Registrar(self)
        system = SystemSetup(tun_name=opts.tun_name, mtu=opts.mtu, state_dir=state,
                             tun_offload=opts.tun_offload, tun_queues=opts.tun_queues)
        socks: list[socket.socket] = []
        flows_restored = False  # until then, saving would overwrite the saved flows
        try:
            node = self.config.node
            system.open(list(node.addresses), self._routes(),
                        local_addresses=self._local_addresses(),
                        connector=opts.advertise_connector)
            self.tun_offload = system.offload
            if opts.advertise_connector:
                system.enable_connector()
                for blocker in system.forward_blockers():
                    log.warning("forwarded traffic may be dropped by %s: allow traffic from %s",
                                blocker, opts.tun_name)
            socks = self._bind_underlay(opts.tun_queues)
            # The control plane sends its handshakes from the first; the pumps read all.
            self.overlay = Overlay(self.datapath, socks[0], self._private_key(), self.ids.peer,
                                   self.refusals)
            self._install_tables()
            self._restore_connector()
            flows_restored = True
            self.datapath.start(system.fds, socks, vnet_hdr=system.vnet_hdr)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.later_log.run)
                for addr in node.addresses:
                    await nursery.start(self._serve_peerapi, str(addr))
                await nursery.start(self.overlay.run)
                await nursery.start(self.registrar.run)
                if self.config.apps:
                    from .dns_resolver import ClientResolver
                    from .dns_server import DNSServer, SourcePolicy

                    self.resolver = ClientResolver(
                        DNSMapper(self.config, self.assignments, log.info), self.forwarder,
                        self.registrar.resolve, self.registrar.register,
                        self.registrar.mapped_in_resolution,
                        assignments_changed=self.assignments_changed, later=self.later_log)
                    # Only this host and --dns-allow networks: never other nodes.
                    self.dns_server = DNSServer(
                        opts.dns_listen, self.resolver.answer, cached=self.resolver.cached,
                        sources=SourcePolicy(dns_allow), refusals=self.refusals)
                    await nursery.start(self.dns_server.run)
                    self.dns_config.apply(dnsconfig.app_domains(self.config))
                local = LocalAPI(lambda: status_document(self), self._exported_metrics,
                                 gauges=GAUGES,
                                 labelled=lambda: peer_metrics(self.overlay.peers()))
                await nursery.start(local.run, str(state / SOCKET_NAME))
                nursery.start_soon(self._read_events)
                nursery.start_soon(self._flush_refusals)
                nursery.start_soon(self._sweep)
                nursery.start_soon(self._persist)
                nursery.start_soon(self._watch_config, system)
                log.info("node %s up: tun=%s overlay=%s connector=%s apps=%s", node.name,
                         opts.tun_name, ",".join(map(str, node.addresses)),
                         opts.advertise_connector, ",".join(a.name for a in self.config.apps))
                task_status.started(self)
        finally:
            with trio.CancelScope(shield=True):
                try:  # first: the system's resolver goes back to its own path at once
                    self.dns_config.close()
                except SystemSetupError as e:
                    log.error("%s", e)
                self.forwarder.close()  # its upstream sockets: an embedded node leaves none
                self.datapath.stop()
                if flows_restored:
                    self._save_flows()
                for sock in socks:
                    sock.close()
                system.close()  # closes the TUN fd too
                self._save_assignments()
                log.info("node %s stopped", opts.hostname)

    # -- start-up pieces -------------------------------------------------------

    def _load_config(self) -> None:
        opts = self.options
        try:
            self.tailnet = load_file(opts.tailnet)
        except OSError as e:
            raise NodeError(f"cannot read tailnet file {opts.tailnet}: {e.strerror}") from None
        except tailnet_mod.TailnetError as e:
            raise NodeError(str(e)) from None
        self._file_stamp = self._stamp()
        try:
            self.config = policy.node_config(self.tailnet, opts.hostname,
                                             opts.advertise_connector)
        except KeyError:
            raise NodeError(f"{opts.tailnet}: no node named {opts.hostname!r}") from None
        tags = self.config.node.tags
        if opts.advertise_tags is not None and sorted(opts.advertise_tags) != sorted(tags):
            raise NodeError(
                f"--advertise-tags {','.join(opts.advertise_tags) or '(none)'} does not match the "
                f"tags of node {opts.hostname!r} in {opts.tailnet}: {','.join(tags) or '(none)'}")
        if opts.advertise_connector and not self.config.own_apps:
            log.warning("node %s advertises as a connector but carries no app's connector tag",
                        opts.hostname)

    def _prepare_dns(self) -> list[tuple[str, int]]:
        """Recover what a crashed run left of --accept-dns, decide this run's mode and
        return the upstreams of the original resolver configuration."""
        opts = self.options
        self.dns_config = AcceptDNS(path=opts.resolv_conf, state_dir=opts.state_path,
                                    link=opts.tun_name, listen=opts.dns_listen)
        want = opts.accept_dns
        sees_apps = bool(dnsconfig.mapped_apps(self.config))
        if want is None:
            want = sees_apps
        elif want and not sees_apps:
            log.warning("--accept-dns: node %s is a client of no app; leaving the system's "
                        "DNS alone", self.options.hostname)
            want = False
        try:
            return self.dns_config.prepare(want)
        except dnsconfig.DNSConfigError as e:
            raise NodeError(f"--accept-dns: {e}") from None

    def _stamp(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self.options.tailnet)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def _routes(self) -> list[IPNetwork]:
        """Into the TUN: every peer's overlay addresses and, on a client, the magic pools."""
        routes: list[IPNetwork] = [ipaddress.ip_network(a) for n in self.config.peers
                                   for a in n.addresses]
        if self.config.apps:
            routes += self.config.pools.magic_routes()
        return routes

    def _dns_allow(self) -> tuple[IPNetwork, ...]:
        allow = self.options.dns_allow
        if not allow:
            return ()
        from .dns_server import parse_dns_allow

        try:
            return parse_dns_allow(",".join(allow))
        except ValueError as e:
            raise NodeError(str(e)) from None

    def _local_addresses(self) -> list[IPAddress]:
        return [ipaddress.ip_address(self.options.dns_listen[0])] if self.config.apps else []

    def _bind_underlay(self, count: int = 1) -> list[socket.socket]:
        # Without an endpoint of its own (behind a NAT) the node listens on every address,
        # both families, and reaches its peers from there. Several sockets (one per TUN
        # queue) share the address with SO_REUSEPORT; the kernel gives each peer's
        # datagrams to one of them, by their addresses and ports.
        host, port = self.config.node.endpoint or ("::", DEFAULT_PORT)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(sock)
                if self.config.node.endpoint is None:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                if count > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((host, port))
                port = sock.getsockname()[1]  # the first one's, when the port is 0
        except OSError as e:
            for sock in socks:
                sock.close()
            hint = " (is another conn25d running?)" if e.errno == errno.EADDRINUSE else ""
            raise NodeError(f"cannot bind the underlay endpoint {host}:{port}: "
                            f"{e.strerror}{hint}") from None
        return socks

    def _private_key(self) -> bytes:
        """This node's WireGuard private key (created when missing); NodeError when the
        tailnet file does not hold its public key."""
        try:
            private, _ = keyfile.node_key(self.options.private_key_path, self.options.tailnet,
                                          self.options.hostname)
        except keyfile.KeyFileError as e:
            raise NodeError(str(e)) from None
        return private

    def _install_tables(self) -> None:
        """Peers, ranges and restored assignments into the datapath's tables."""
        self.dataplane.install_config(self.config)
        self.overlay.configure(self.config)
        # A set: Tailnet.node scans every node, once per assignment it would be.
        names = {n.name for n in self.config.tailnet.nodes}
        for a in self.assignments:
            if a.connector in names:
                self.dataplane.client_registered(a, a.connector)

    async def _serve_peerapi(self, host: str, *,
                             task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        from .http import serve_tcp

        api = PeerAPI(self, self.refusals)
        # Only other nodes are answered, each within a budget of its own.
        await serve_tcp(host, self.peerapi_port, api.handle, limits=PEERAPI_LIMITS,
                        accept_source=api.is_peer, refusals=self.refusals, name="peerapi",
                        task_status=task_status)

    # -- background tasks ----------------------------------------------------------

    async def _read_events(self) -> None:
        dp = self.datapath
        while True:
            await trio.lowlevel.wait_readable(dp.event_fd)
            now = self.now()
            self.overlay.handle_handshakes()
            for ev in dp.read_events():
                if ev.kind is EventKind.HANDSHAKE_WANTED:
                    self.overlay.handshake_wanted(ev.peer)
                    continue
                if ev.kind is EventKind.SESSION_CONFIRMED:
                    self.overlay.confirmed(ev.peer)
                    continue
                if ev.kind is EventKind.UNKNOWN_SESSION:
                    self.overlay.unknown_session(ev.transit, ev.peer)
                    continue
                transit = ipaddress.ip_address(ev.transit)
                if ev.kind is EventKind.FLOW_CREATED and ev.role is Role.CLIENT:
                    self.assignments.flow_started(transit, now)
                elif ev.kind is EventKind.FLOW_REMOVED and ev.role is Role.CLIENT:
                    self.assignments.flow_ended(transit, now)
                elif ev.kind is EventKind.REJECT:
                    # Forgeable per packet: a summary per peer, not a line each. The
                    # registrar de-duplicates the re-registrations itself.
                    self.refusals.refuse(self.ids.peer_name(ev.peer), "reject_received",
                                         f"connector rejected transit={transit}: re-registering")
                    self.registrar.rejected(transit)
                elif ev.kind is EventKind.UNMAPPED_TRANSIT:
                    self.refusals.refuse(self.ids.peer_name(ev.peer), "unmapped_transit",
                                         f"rejected unmapped transit={transit}")

    async def _flush_refusals(self) -> None:
        """Report the tail of each burst of refusals once it is over."""
        while True:
            await trio.sleep(REFUSAL_FLUSH_INTERVAL)
            self.refusals.flush()

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = self.now()
            self.assignments.reclaim(now)  # each one goes through _forget
            if self.connector is not None and self.connector.sweep(now, 1000):
                self._dirty.set()  # (gone from the datapath with the table's store)
            self.datapath.sweep(monotonic_ms(), 1000)
            if self.connector is not None:
                # A connector crash loses at most this interval's flows of this kind.
                # In a thread, the file write included: the event loop must not wait on a disk.
                await trio.to_thread.run_sync(self._save_flows)
            release_freed_memory()  # what this interval's bursts freed, back to the system

    def _forget(self, a: Assignment) -> None:
        """A reclaimed assignment: its magic IP is unassigned again from now on."""
        self.dataplane.client_forgotten(a)
        self.counters["reclaimed"] += 1
        log.info("reclaimed app=%s domain=%s magic=%s transit=%s real=%s", a.app, a.domain,
                 a.magic, a.transit, a.real)
        self._dirty.set()

    async def _persist(self) -> None:
        pause = PERSIST_DEBOUNCE
        while True:
            await self._dirty.wait()
            await trio.sleep(pause)  # debounce: one write for a burst of changes
            self._dirty = trio.Event()
            # A snapshot holds the loop in proportion to what it saves (100,000 mappings
            # on a connector: a good part of a second), so the pause before the next one
            # grows with it: saving takes at most a tenth of the loop.
            started = trio.current_time()
            await self._save_state()
            pause = max(PERSIST_DEBOUNCE, 9 * (trio.current_time() - started))

    async def _watch_config(self, system: SystemSetup) -> None:
        while True:
            with trio.move_on_after(RELOAD_POLL):
                await self._reload_requested.wait()
            if self._reload_requested.is_set() or self._stamp() != self._file_stamp:
                # Requests made from here on wait for the next round.
                self._reload_requested = trio.Event()
                done, self._reload_done = self._reload_done, trio.Event()
                self._reload(system)
                done.set()

    def _reload(self, system: SystemSetup) -> None:
        """Apply a changed tailnet file; a bad one is logged and the old configuration stays."""
        opts = self.options
        self._file_stamp = self._stamp()
        try:
            tn = load_file(opts.tailnet)
            cfg = policy.node_config(tn, opts.hostname, opts.advertise_connector)
        except (OSError, tailnet_mod.TailnetError, KeyError) as e:
            self.counters["reload_errors"] += 1
            log.error("tailnet file %s rejected, keeping the running configuration:\n%s",
                      opts.tailnet, e)
            return
        own, new = self.config.node, cfg.node
        if (new.addresses, new.endpoint, new.public_key) != \
                (own.addresses, own.endpoint, own.public_key):
            self.counters["reload_errors"] += 1
            log.error("tailnet file %s changes this node's own addresses, endpoint or public "
                      "key; restart conn25d to apply that (keeping the running configuration)",
                      opts.tailnet)
            return
        self.tailnet, self.config = tn, cfg
        self.assignments.reconfigure(cfg.pools)
        if self.connector is not None and self.connector.reconfigure(cfg):
            self._dirty.set()
        self._install_tables()  # and removes the peers the file no longer has
        system.set_routes(self._routes())
        if self.resolver is not None:
            self.resolver.reconfigure(cfg)
        self.dns_config.update(dnsconfig.app_domains(cfg))
        self.counters["reloads"] += 1
        log.info("tailnet file %s reloaded", opts.tailnet)

    # -- persistence -----------------------------------------------------------------

    def _load_state(self, name: str, what: str, restore: Callable[[bytes], int]) -> None:
        """Feed the state file `name` to `restore` (which returns how many it
        took). A file it refuses (ValueError) is moved aside to NAME.bad, so
        the next save does not overwrite what an operator may want to read."""
        path = self.options.state_path / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            n = restore(data)
        except ValueError as e:
            bad = path.with_suffix(".bad")
            with contextlib.suppress(OSError):
                path.rename(bad)
            log.error("ignoring saved %s (%s); moved to %s", what, e, bad)
            return
        log.info("restored %d %s from %s", n, what, path)

    def _restore_assignments(self) -> None:
        # A saved magic or transit IP on a node's address would route that node's
        # traffic into the TUN: such entries are dropped, each with a line.
        nodes = [addr for node in self.config.tailnet.nodes for addr in node.addresses]
        self._load_state(ASSIGNMENTS_FILE, "assignments", lambda data: self.assignments.restore(
            data, self.now(), node_addresses=nodes, report=log.warning))

    def _restore_connector(self) -> None:
        """The mappings and the flows of the last run, so that flows in flight
        through this connector come back after a restart. The flows only
        where their return packets cannot re-create them (several transit IPs
        of a client to one real address), and after the mappings they must
        match."""
        if self.connector is None:  # no longer a connector: the files are stale
            for name in (CONNECTOR_FILE, FLOWS_FILE):
                (self.options.state_path / name).unlink(missing_ok=True)
            return
        connector = self.connector

        def mappings(data: bytes) -> int:  # into the datapath too: the table's store
            return len(connector.restore(data, self.now(), log.warning))

        def flows(data: bytes) -> int:
            n = self.datapath.restore_flows(data, monotonic_ms())
            self._saved_flows = data
            return n

        self._load_state(CONNECTOR_FILE, "connector mappings", mappings)
        self._load_state(FLOWS_FILE, "connector flows", flows)

    def _save_flows(self) -> None:
        data = self.datapath.save_flows()
        if data == self._saved_flows:
            return
        path = self.options.state_path / FLOWS_FILE
        try:
            if data:
                replace_file(path, data)
            else:
                path.unlink(missing_ok=True)
            self._saved_flows = data
        except OSError as e:
            log.error("cannot save %s: %s", path, e)

    def _save_assignments(self) -> None:
        """Assignments and, on a connector, its mappings, to the state dir (at exit)."""
        for name, data in self._snapshots(every=True):
            self._write_state(name, data)

    async def _save_state(self) -> None:
        """:meth:`_save_assignments` from the running loop, which must not wait on a disk
        (a file's replacement takes ~0.5 ms, which a DNS answer would wait for): a snapshot
        made into bytes is written in a worker thread; only a large connector's, streamed
        from its table (which must not change meanwhile), is written here."""
        for name, data in self._snapshots(every=False):
            if isinstance(data, bytes):
                await trio.to_thread.run_sync(self._write_state, name, data)
            else:
                self._write_state(name, data)

    def _snapshots(self, *, every: bool) -> Iterator[tuple[str, bytes | Iterable[bytes]]]:
        """(file name, its content) to save; without ``every``, not the assignments when
        they are as last saved."""
        if not hasattr(self, "assignments"):
            return
        if every or self.assignments.snapshot_changed or not self._assignments_saved:
            self._assignments_saved = False
            yield ASSIGNMENTS_FILE, self.assignments.snapshot()
        if self.connector is not None:
            # In pieces when large: it may hold 100,000 mappings, tens of MiB at once.
            yield CONNECTOR_FILE, (self.connector.snapshot() if len(self.connector)
                                   <= SNAPSHOT_IN_THREAD else self.connector.snapshot_chunks())

    def _write_state(self, name: str, data: bytes | Iterable[bytes]) -> None:
        path = self.options.state_path / name
        try:
            replace_file(path, data)
        except OSError as e:
            log.error("cannot save %s: %s", path, e)
            return
        if name == ASSIGNMENTS_FILE:
            self._assignments_saved = True


class ServiceManager(Protocol):
    """What :func:`serve` tells the service manager (``sdnotify.Notifier``)."""

    watchdog_interval: float | None  # seconds between two watchdog() calls; None: none

    def ready(self, status: str | None = None) -> bool: ...
    def reloading(self) -> bool: ...
    def stopping(self) -> bool: ...
    def watchdog(self) -> bool: ...


async def serve(options: NodeOptions, *, manager: ServiceManager | None = None,
                task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a node until SIGINT or SIGTERM (SIGHUP re-reads the tailnet file), telling
    ``manager`` (default: systemd's, when ``$NOTIFY_SOCKET`` names one) when it serves,
    reloads and stops, and pinging its watchdog while the event loop runs."""
    import signal

    manager = Notifier.from_environ() if manager is None else manager
    node = Node(options)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)  # returns once TUN, DNS and the APIs serve
            # What start-up made (modules, configuration, restored state: tens of
            # thousands of objects) lives as long as the process: out of the cyclic
            # collector's full passes, which would otherwise walk all of it every
            # time and hold a query for as long (~10 ms).
            gc.freeze()
            manager.ready(_ready_status(node))
            if manager.watchdog_interval is not None:
                nursery.start_soon(_ping_watchdog, manager, manager.watchdog_interval)
            task_status.started(node)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    manager.reloading()
                    await node.reload()
                    manager.ready(_ready_status(node))
                    continue
                manager.stopping()
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _ready_status(node: Node) -> str:
    """One line for ``systemctl status``."""
    cfg = node.config
    return (f"serving {cfg.node.name} on {node.options.tun_name}: peers {len(cfg.peers)}, "
            f"apps {len(cfg.apps)}, reloads {node.counters['reloads']}, "
            f"rejected reloads {node.counters['reload_errors']}")


async def _ping_watchdog(manager: ServiceManager, interval: float) -> None:
    # A ping only from the running event loop: a loop that hangs stops them, and the
    # service manager restarts the node.
    while True:
        manager.watchdog()
        await trio.sleep(interval)
