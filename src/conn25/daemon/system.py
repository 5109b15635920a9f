"""The node's changes to the system: the TUN device and its addresses, MTU and
routes (pyroute2, in a short-lived helper process: ``netlink_helper``), and on
a connector IP forwarding (/proc/sys) plus an nftables table of its own
(``nft -f -``).

Everything made here is undone by :meth:`SystemSetup.close`; a failed
:meth:`SystemSetup.open` undoes its own partial work before raising.

What a crash can leave behind, and why it does not block a restart:

* the TUN device goes away with the process's fd; addresses and routes on it
  go with it. A *persistent* TUN of the same name that no process holds is
  removed before ours is created; one that a live process holds is refused
  (another node is running).
* the nftables table (``table inet conn25d_<tun>``) outlives the process; the
  next ``open`` deletes it.
* the forwarding (and conntrack) sysctls stay at 1. With ``state_dir`` set, the values found
  before the first change are kept in a file until restored, so the next run
  still restores the real originals.

Forwarding is switched on for the whole namespace, as any router does: writing
``net.ipv4.ip_forward`` also sets every interface's ``forwarding``, and with
``net.ipv6.conf.all.forwarding=1`` interfaces with ``accept_ra=1`` stop taking
router advertisements (a host whose IPv6 comes from SLAAC needs
``accept_ra=2``). Restoring writes the old values back only if they differ.
Two nodes in one namespace share these sysctls: the first to stop restores them.

Our routes carry the protocol number :data:`RT_PROTO` (``ip route ... proto
25``) so that a dump finds exactly ours. We add no ``ip rule``.

Filtering of our own: the table's forward chain lets into the TUN only the
replies of connections it masqueraded, and out of the TUN only
original-direction traffic that leaves through another interface; the rest is
counted and dropped (``nft list table inet conn25d_<tun>`` shows the counts).

Masquerade: older kernels do not tell the postrouting hook the input interface
of a forwarded packet, so the forward chain sets one bit of the packet mark on
packets that came in on the TUN and leave through another interface, and
postrouting masquerades packets carrying that bit. The mark is set after the
routing decision, so it never changes how a packet is routed; the bit
(:data:`MASQ_MARK`) is a constructor argument in case it collides with another
user of the mark.

The calls block (netlink, ``nft``); they run at start, reload and stop, so a
trio node may call them directly or through ``trio.to_thread.run_sync``.

Filtering: a packet that another table drops stays dropped whatever our table
says (an nftables ``accept`` ends only its own base chain), so we do not try
to punch holes into other tables. :meth:`SystemSetup.forward_blockers` names
forward chains whose policy is drop (for example Docker's ``FORWARD`` policy)
so the node can log what the administrator must allow; rules that drop inside
an accepting chain, and iptables-legacy, are not seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..core.iprange import IPAddress, IPNetwork
from .netlink_helper import Netlink, NetlinkError
from .tun import OFFLOAD_OFF, check_queues, open_tun_queues, set_offload

log = logging.getLogger("conn25d.system")
_T = TypeVar("_T")

RT_PROTO = 25
"""Route protocol number of conn25d's routes."""
MASQ_MARK = 0x2000
"""Packet-mark bit meaning "came in on the TUN, masquerade on the way out"."""
MAIN_TABLE = 254
IPV6_MIN_MTU = 1280
IN6_ADDR_GEN_MODE_NONE = 1
IFA_F_NODAD = 0x02
# Set to 1 on a connector, the old values kept. Conntrack's TCP window tracking
# judges some segments of a masqueraded connection out of window (ACKs of data
# whose earlier ACKs were lost, as when this node restarted in the middle of a
# download); such a packet is neither un-masqueraded nor let through the table,
# and the connection stalls or, delivered locally, is reset. Liberal tracking
# still needs the connection's exact addresses and ports; the end hosts check
# sequence numbers themselves.
CONNECTOR_SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
                     "net/netfilter/nf_conntrack_tcp_be_liberal")

_TUN_NAME = re.compile(r"[A-Za-z0-9_-]{1,15}")


class SystemSetupError(RuntimeError):
    """A change to the system failed; the message says which one."""


def nft_table_name(tun_name: str) -> str:
    return "conn25d_" + tun_name.replace("-", "_")


def _check_tun_name(name: str) -> str:
    # Stricter than the kernel: the name also goes into an nftables script.
    if not isinstance(name, str) or not _TUN_NAME.fullmatch(name):
        raise ValueError(f"bad TUN device name {name!r} (1-15 of A-Z a-z 0-9 _ -)")
    return name


def _reason(exc: BaseException) -> str:
    if isinstance(exc, NetlinkError):
        return f"{os.strerror(exc.code)} (errno {exc.code})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def _step(what: str, hints: dict[int, str] | None = None) -> Iterator[None]:
    """Turn a failure of one system change into a SystemSetupError naming it
    (plus a hint for the errno where one helps)."""
    try:
        yield
    except SystemSetupError:
        raise
    except (OSError, NetlinkError, ValueError) as e:
        hint = (hints or {}).get(getattr(e, "code", None) or getattr(e, "errno", None) or 0)
        raise SystemSetupError(f"{what} failed: {_reason(e)}"
                               + (f" ({hint})" if hint else "")) from e


@contextlib.contextmanager
def _undone_on_failure(undo: Callable[[], None]) -> Iterator[None]:
    """On any failure (cancellation too) call ``undo``, so nothing half set up remains;
    a failing undo is logged, not raised, so the original error is the one reported."""
    try:
        yield
    except BaseException:
        try:
            undo()
        except SystemSetupError as e:
            log.error("%s", e)
        raise


def replace_file(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (or its pieces, in order) to ``path`` through a temporary file,
    so that a crash leaves either the old content or the new one, never half of it."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            for piece in data:
                f.write(piece)
    tmp.replace(path)


def release_freed_memory() -> None:
    """Give the pages of memory freed since the last call back to the system.

    glibc keeps freed memory for reuse: after a burst of registrations, a
    snapshot or a status request, the daemon would hold the peak's worth of
    pages for good. ``malloc_trim(0)`` returns the free pages, in the middle of
    the heap too (a few ms for a heap of 100 MiB). A no-op without glibc.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None)
    return _LIBC


_LIBC: ctypes.CDLL | None = None


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key


def _read_sysctl(key: str) -> str:
    return _sysctl_path(key).read_text().strip()


def _write_sysctl(key: str, value: str) -> None:
    _sysctl_path(key).write_text(value + "\n")


def _route_key(msg: Any) -> IPNetwork:
    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if msg["family"] == socket.AF_INET else "::")
    return ipaddress.ip_network(f"{dst}/{msg['dst_len']}")


def _run_nft(nft: str, script: str | None, *args: str) -> str:
    """Run ``nft [args] -f -`` with ``script`` (or ``nft args``); stdout, or OSError."""
    cmd = [nft, *args] + (["-f", "-"] if script is not None else [])
    try:
        r = subprocess.run(cmd, input=script, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise OSError(f"{' '.join(cmd)} timed out") from None
    if r.returncode != 0:
        raise OSError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def _nft_tables(nft: str) -> list[tuple[str, str]] | None:
    """(family, name) of every nftables table; None when nft is unusable here."""
    try:
        out = _run_nft(nft, None, "-j", "list", "tables")
    except OSError:
        return None
    return [(i["table"]["family"], i["table"]["name"])
            for i in json.loads(out)["nftables"] if "table" in i]


def _delete_nft_table(nft: str, table: str) -> None:
    # Declaring the table first makes the delete succeed whether or not it exists,
    # in one transaction.
    _run_nft(nft, f"table inet {table}\ndelete table inet {table}\n")


def _remove_table(nft: str, table: str, what: str) -> None:
    """Delete our table if it exists; without a usable nft there is none to delete."""
    tables = _nft_tables(nft)
    if tables is not None and ("inet", table) in tables:
        log.info("removing %snftables table inet %s", what, table)
        with _step(f"removing {what}nftables table inet {table}"):
            _delete_nft_table(nft, table)


def _ruleset(tun: str, table: str, mark: int) -> str:
    # The second belt behind the datapath's own rules: a connector is not a
    # router. Into the TUN from elsewhere pass only the replies of
    # connections this node masqueraded, that is of flows the datapath
    # translated (the datapath re-creates a lost flow from such a reply, so
    # nothing else may reach it); out of the TUN only original-direction
    # traffic, masqueraded, and never back into the TUN. Masquerade picks a random
    # port for every connection: a client reuses a source port toward two transit IPs
    # of one real address, which are one tuple once translated here, and a server still
    # holding the first in TIME_WAIT would refuse the second's SYN (its timestamps
    # count from another base), costing the client a reset and a second SYN.
    return f"""\
table inet {table}
delete table inet {table}
table inet {table} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname "{tun}" iifname != "{tun}" ct direction reply ct status snat accept
        oifname "{tun}" counter drop
        iifname "{tun}" ct direction original meta mark set meta mark | {mark:#x} accept
        iifname "{tun}" counter drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & {mark:#x} == {mark:#x} oifname != "{tun}" masquerade fully-random
    }}
}}
"""


class SystemSetup:
    """The TUN device of one node and everything around it.

    ``open`` returns the TUN fd for the datapath (the first queue's; ``fds``
    holds one per queue); stop the pumps before ``close``, which closes them.
    ``close`` is idempotent and also undoes a partial ``open``/``enable_connector``.
    """

    def __init__(self, tun_name: str = "conn25", mtu: int = 1420, *, nft: str = "nft",
                 state_dir: str | os.PathLike[str] | None = None,
                 masq_mark: int = MASQ_MARK, vnet_hdr: bool = True,
                 tun_offload: bool = False, tun_queues: int = 1) -> None:
        self.tun_name = _check_tun_name(tun_name)
        # Queues of a multi-queue TUN: one fd each (fds), one pump pair each.
        self.tun_queues = check_queues(tun_queues)
        # The TUN's packets carry a virtio-net header, so the datapath can write
        # super-packets (Datapath.start(vnet_hdr=True) must match).
        self.vnet_hdr = vnet_hdr
        if tun_offload and not vnet_hdr:
            raise ValueError("TUN offloads need the virtio-net header (vnet_hdr)")
        # TSO/USO super-packets on reads, which the datapath splits; `offload` is
        # the mode the kernel accepted (tun.OFFLOAD_MODES), "off" until open().
        self.tun_offload = tun_offload
        self.offload = OFFLOAD_OFF
        if not isinstance(mtu, int) or not 576 <= mtu <= 65535:
            raise ValueError(f"bad MTU {mtu!r} (576-65535)")
        if not isinstance(masq_mark, int) or masq_mark <= 0 or masq_mark.bit_count() != 1 \
                or masq_mark >= 1 << 32:
            raise ValueError(f"bad masquerade mark {masq_mark!r} (one bit of 32)")
        self.mtu = mtu
        self.nft = nft
        self.masq_mark = masq_mark
        self.table = nft_table_name(tun_name)
        self._state_file = (Path(state_dir) / f"sysctl-{tun_name}.json"
                            if state_dir is not None else None)
        self.fd: int | None = None  # the first queue's
        self.fds: list[int] = []
        self.index: int | None = None
        self._opened = False
        self._nft_touched = False
        self._saved_sysctls: dict[str, str] | None = None
        self.connector_enabled = False

    # -- TUN, addresses, routes ------------------------------------------------

    def open(self, addresses: Iterable[IPAddress], routes: Iterable[IPNetwork],
             local_addresses: Iterable[IPAddress] = (), *, connector: bool = False) -> int:
        """Create the TUN with the node's addresses (/32, /128), extra local
        addresses (e.g. the DNS listen address) and ``routes`` through it;
        return its fd. On failure nothing of it remains and SystemSetupError
        says which step failed.

        Our nftables table left by a run that crashed is removed, unless
        ``connector`` (:meth:`enable_connector` follows): then it stays until that
        replaces it in one transaction. Without any NAT chain the kernel would not
        un-NAT the replies of the connections that run masqueraded, and would answer
        the first of them with a reset, ending a download a restart should survive."""
        if self._opened:
            raise SystemSetupError(f"TUN {self.tun_name}: already open")
        addrs = self._addresses([*addresses, *local_addresses])
        nets = self._networks(routes)
        if self.mtu < IPV6_MIN_MTU and any(a.version == 6 for a in [*addrs, *nets]):
            raise ValueError(f"MTU {self.mtu} is below IPv6's minimum {IPV6_MIN_MTU}")
        self._opened = True
        with _undone_on_failure(self.close), Netlink() as ipr:
            self._remove_stale_device(ipr)
            if connector:
                self._keep_leftover_table()
            else:
                _remove_table(self.nft, self.table, "leftover ")
            with _step(f"creating TUN device {self.tun_name}"):
                self.fds, _ = open_tun_queues(self.tun_name, self.tun_queues,
                                              vnet_hdr=self.vnet_hdr)
                self.fd = self.fds[0]
            if self.tun_offload:
                with _step(f"turning on offloads of TUN device {self.tun_name}"):
                    for fd in self.fds:
                        self.offload = set_offload(fd)
            with _step(f"setting up TUN device {self.tun_name}"):
                idxs = ipr.link_lookup(ifname=self.tun_name)
                if not idxs:
                    raise OSError(f"device {self.tun_name} vanished after creation")
                self.index = idxs[0]
                self._configure_link(ipr, addrs)
                for net in nets:
                    self._add_route(ipr, net)
        log.info("TUN %s up: mtu %d, offload %s, addresses %s, %d routes", self.tun_name,
                 self.mtu, self.offload, " ".join(map(str, addrs)), len(nets))
        return self.fd

    def _configure_link(self, ipr: Netlink, addrs: list[IPAddress]) -> None:
        idx, name = self.index, self.tun_name
        if any(a.version == 6 for a in addrs):
            # No link-local address of its own: the TUN carries only overlay traffic.
            with _step(f"setting addr_gen_mode none on {name}"):
                ipr.link("set", index=idx, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [
                    ["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]})
        with _step(f"setting MTU {self.mtu} on {name}"):
            ipr.link("set", index=idx, mtu=self.mtu)
        with _step(f"setting {name} up"):
            ipr.link("set", index=idx, state="up")
        for a in addrs:
            hints = {errno.EACCES: f"is IPv6 disabled? net.ipv6.conf.{name}.disable_ipv6"}
            with _step(f"adding address {a}/{a.max_prefixlen} to {name}",
                       hints if a.version == 6 else None):
                # nodad: the address is usable at once (no peers on the TUN to clash with).
                ipr.addr("add", index=idx, address=str(a), prefixlen=a.max_prefixlen,
                         **({"flags": IFA_F_NODAD} if a.version == 6 else {}))

    def _add_route(self, ipr: Netlink, net: IPNetwork) -> None:
        with _step(f"adding route {net} via {self.tun_name}",
                   {errno.EEXIST: "a route to it exists already, through another device?"}):
            ipr.route("add", dst=str(net), oif=self.index, proto=RT_PROTO, table=MAIN_TABLE)

    def routes(self) -> list[IPNetwork]:
        """Our routes through the TUN as the kernel has them now."""
        self._need_open()
        with Netlink() as ipr:
            return self._routes(ipr)

    def _routes(self, ipr: Netlink) -> list[IPNetwork]:
        with _step(f"listing routes of {self.tun_name}"):
            return sorted((_route_key(r) for r in ipr.route("dump", proto=RT_PROTO)
                           if r.get_attr("RTA_OIF") == self.index
                           and r.get_attr("RTA_TABLE") == MAIN_TABLE),
                          key=lambda n: (n.version, n))

    def set_routes(self, routes: Iterable[IPNetwork]) -> None:
        """Make the routes through the TUN exactly ``routes`` (reload). Adds
        first, then removes; if an add fails the routes added by this call are
        removed again and the old set stays."""
        self._need_open()
        want = set(self._networks(routes))
        with Netlink() as ipr:
            have = set(self._routes(ipr))
            added: list[IPNetwork] = []
            try:
                for net in sorted(want - have, key=lambda n: (n.version, n)):
                    self._add_route(ipr, net)
                    added.append(net)
            except SystemSetupError:
                for net in added:
                    self._del_route(ipr, net)
                raise
            for net in have - want:
                self._del_route(ipr, net)
        if want != have:
            log.info("routes via %s: +%d -%d", self.tun_name, len(want - have), len(have - want))

    def _del_route(self, ipr: Netlink, net: IPNetwork) -> None:
        try:
            ipr.route("del", dst=str(net), oif=self.index, proto=RT_PROTO, table=MAIN_TABLE)
        except NetlinkError as e:
            if e.code != errno.ESRCH:  # already gone
                raise SystemSetupError(
                    f"removing route {net} via {self.tun_name} failed: {_reason(e)}") from e

    def _remove_stale_device(self, ipr: Netlink) -> None:
        """Remove a persistent TUN of our name that no process holds; refuse
        anything else of that name."""
        name = self.tun_name
        with _step(f"checking for an existing device {name}"):
            idxs = ipr.link_lookup(ifname=name)
            if not idxs:
                return
            link = ipr.link("get", index=idxs[0])[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            data = info.get_attr("IFLA_INFO_DATA") if info else None
            if kind != "tun" or data is None or data.get_attr("IFLA_TUN_TYPE") != 1:
                if kind == "tun" and data is not None:
                    kind = "tap"
                raise SystemSetupError(
                    f"a network device named {name} exists and is not a TUN device "
                    f"(kind {kind or 'unknown'}); remove it or choose another TUN name")
            # A non-persistent TUN exists only while a process holds it; a persistent
            # one has carrier exactly while it is attached.
            if not data.get_attr("IFLA_TUN_PERSIST") or link.get_attr("IFLA_CARRIER"):
                raise SystemSetupError(
                    f"TUN device {name} is in use by another process "
                    "(is another conn25d running with the same TUN name?)")
            log.info("removing leftover persistent TUN device %s", name)
        with _step(f"removing leftover TUN device {name}"):
            ipr.link("del", index=link["index"])

    # -- connector: forwarding and masquerade ----------------------------------

    def _keep_leftover_table(self) -> None:
        """Take a crashed run's table as ours, for enable_connector to replace (and close
        to remove, should this run end before that)."""
        tables = _nft_tables(self.nft)
        if tables is not None and ("inet", self.table) in tables:
            log.info("keeping leftover nftables table inet %s until it is replaced", self.table)
            self._nft_touched = True

    def enable_connector(self) -> None:
        """IP forwarding on (old values kept) and our nftables table, which
        masquerades packets from the TUN that leave through another interface."""
        self._need_open()
        if self.connector_enabled:
            return
        with _undone_on_failure(self._disable_connector):
            self._nft_touched = True
            with _step(f"installing nftables table inet {self.table}"):
                _run_nft(self.nft, _ruleset(self.tun_name, self.table, self.masq_mark))
            self._enable_forwarding()
            self.connector_enabled = True
        for b in self.forward_blockers():
            log.warning("forwarded traffic from %s may be dropped: %s", self.tun_name, b)
        log.info("connector: forwarding on, masquerade via table inet %s", self.table)

    def _enable_forwarding(self) -> None:
        # No IPv6: v4 only. The conntrack one exists once our table loaded conntrack.
        keys = [k for k in CONNECTOR_SYSCTLS if _sysctl_path(k).exists()]
        saved = None
        if self._state_file is not None and self._state_file.exists():
            # A crash left forwarding on; the file has what was there before us.
            with _step(f"reading {self._state_file}"):
                saved = {k: str(v) for k, v in json.loads(self._state_file.read_text()).items()
                         if k in keys}
        if saved is None or set(saved) != set(keys):
            with _step("reading the forwarding sysctls"):
                saved = {k: _read_sysctl(k) for k in keys}
            if self._state_file is not None:
                with _step(f"writing {self._state_file}"):
                    self._state_file.parent.mkdir(parents=True, exist_ok=True)
                    replace_file(self._state_file, json.dumps(saved).encode())
        self._saved_sysctls = saved
        for k in keys:
            with _step(f"setting {k.replace('/', '.')}=1"):
                _write_sysctl(k, "1")

    def _disable_connector(self) -> None:
        self.connector_enabled = False
        errors: list[str] = []
        if self._nft_touched:
            try:
                _remove_table(self.nft, self.table, "")
                self._nft_touched = False
            except SystemSetupError as e:
                errors.append(str(e))
        if self._saved_sysctls is not None:
            for k, v in self._saved_sysctls.items():
                try:
                    with _step(f"restoring {k.replace('/', '.')}={v}"):
                        if _read_sysctl(k) != v:
                            _write_sysctl(k, v)
                except SystemSetupError as e:
                    errors.append(str(e))
            if not errors:
                self._saved_sysctls = None
                if self._state_file is not None:
                    self._state_file.unlink(missing_ok=True)
        if errors:
            raise SystemSetupError("; ".join(errors))

    def forward_blockers(self) -> list[str]:
        """Forward-hook chains of other tables whose policy drops (our accept
        cannot override them)."""
        try:
            out = _run_nft(self.nft, None, "-j", "list", "chains")
        except OSError:
            return []
        return [f"nftables chain {c['family']} {c['table']} {c['name']} has policy drop; "
                f"allow packets from {self.tun_name} there (e.g. iifname \"{self.tun_name}\" "
                "accept, and established/related back)"
                for c in (i["chain"] for i in json.loads(out)["nftables"] if "chain" in i)
                if c.get("hook") == "forward" and c.get("policy") == "drop"
                and c.get("table") != self.table]

    # -- teardown ----------------------------------------------------------------

    def close(self) -> None:
        """Remove everything this object made and restore the sysctls.
        Idempotent; every step is tried even if an earlier one fails."""
        errors: list[str] = []
        try:
            self._disable_connector()
        except SystemSetupError as e:
            errors.append(str(e))
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # a non-persistent TUN goes away with its last fd
        self.fds = []
        self.fd = None
        if self.index is not None:
            try:
                with Netlink() as ipr, _step(f"removing TUN device {self.tun_name}"):
                    # Only our device: same index and name (the name may be reused).
                    if self.index in ipr.link_lookup(ifname=self.tun_name):
                        ipr.link("del", index=self.index)
                self.index = None
            except SystemSetupError as e:
                errors.append(str(e))
        self._opened = False
        if errors:
            raise SystemSetupError(f"cleaning up TUN {self.tun_name}: " + "; ".join(errors))
        log.debug("TUN %s and its set-up removed", self.tun_name)

    def __enter__(self) -> SystemSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------

    def _need_open(self) -> None:
        if self.index is None:
            raise SystemSetupError(f"TUN {self.tun_name} is not open")

    @staticmethod
    def _addresses(items: Iterable[IPAddress]) -> list[IPAddress]:
        return _unique(items, (ipaddress.IPv4Address, ipaddress.IPv6Address), "an IP address")

    @staticmethod
    def _networks(items: Iterable[IPNetwork]) -> list[IPNetwork]:
        return _unique(items, (ipaddress.IPv4Network, ipaddress.IPv6Network), "an IP network")


def _unique(items: Iterable[_T], types: tuple[type, ...], what: str) -> list[_T]:
    """``items`` in order without repeats; ValueError for one that is not ``what``."""
    out: list[_T] = []
    for x in items:
        if not isinstance(x, types):
            raise ValueError(f"{x!r} is not {what}")
        if x not in out:
            out.append(x)
    return out


def leftovers(tun_name: str, *, nft: str = "nft") -> list[str]:
    """Anything of conn25d's still on the system for ``tun_name``: the device,
    routes or rules with our protocol number, our nftables table."""
    _check_tun_name(tun_name)
    found: list[str] = []
    with Netlink() as ipr:
        for idx in ipr.link_lookup(ifname=tun_name):
            found.append(f"network device {tun_name} (index {idx})")
        for r in ipr.route("dump", proto=RT_PROTO):
            found.append(f"route {_route_key(r)} proto {RT_PROTO} table {r.get_attr('RTA_TABLE')}"
                         f" oif {r.get_attr('RTA_OIF')}")
        for family in (socket.AF_INET, socket.AF_INET6):
            for rule in ipr.get_rules(family=family):
                if rule.get_attr("FRA_PROTOCOL") == RT_PROTO:
                    found.append(f"ip rule (family {family}) priority "
                                 f"{rule.get_attr('FRA_PRIORITY')} proto {RT_PROTO}")
    table = nft_table_name(tun_name)
    if ("inet", table) in (_nft_tables(nft) or []):
        found.append(f"nftables table inet {table}")
    return found
