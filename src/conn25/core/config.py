"""The typed configuration, as pure data: what a tailnet file means, and one node's view of it.

``conn25.core.tailnet`` turns a file into a :class:`Tailnet` (reporting every
error with its place); ``conn25.core.policy.node_config`` derives the
:class:`NodeConfig` that one node's client and connector cores run on. This
module answers no policy question (which selector names which node, who may
reach what): those are ``acl``'s and ``policy``'s, which import this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from .dnsname import DomainIndex
from .iprange import IPAddress, IPNetwork, IPRange, IPSet

# Attribute names in nodeAttrs[].app, as in the upstream policy file.
APP_ATTRS = ("tailscale.com/app-connectors", "tailscale.com/app-connectors-experimental")
POOL_ATTR = "tailscale.com/app-connectors-experimental-ippools"
DEFAULT_PORT = 41641
# Persistent keepalive (seconds) of a node without an endpoint of its own: it is the
# one that must keep the NAT mappings on its way open. 25 s as wg(8) suggests.
DEFAULT_KEEPALIVE = 25


class App(msgspec.Struct, frozen=True):
    name: str
    domains: tuple[str, ...]  # normalised FQDNs; a wildcard is "*.base."
    connectors: tuple[str, ...]  # tags, "tag:..."


class Pools(msgspec.Struct, frozen=True):
    v4_magic: IPSet = IPSet()
    v6_magic: IPSet = IPSet()
    v4_transit: IPSet = IPSet()
    v6_transit: IPSet = IPSet()

    def magic(self, version: int) -> IPSet:
        return self.v4_magic if version == 4 else self.v6_magic

    def transit(self, version: int) -> IPSet:
        return self.v4_transit if version == 4 else self.v6_transit

    def named(self) -> list[tuple[str, IPSet]]:
        """Each pool with its policy-file name, for error messages."""
        return [
            ("v4MagicIPPool", self.v4_magic),
            ("v6MagicIPPool", self.v6_magic),
            ("v4TransitIPPool", self.v4_transit),
            ("v6TransitIPPool", self.v6_transit),
        ]

    def magic_routes(self) -> list[IPNetwork]:
        """Exactly the union of both magic pools, as prefixes to route into the TUN."""
        return self.v4_magic.prefixes() + self.v6_magic.prefixes()

    def is_transit(self, addr: IPAddress) -> bool:
        return addr in self.transit(addr.version)


# Used when no node attribute gives pools. They lie outside the ranges that
# node addresses are drawn from in the example (100.64.0.0/16 and
# fd7a:115c:a1e0::/64); a tailnet whose nodes use them gets an overlap error.
DEFAULT_POOLS = Pools(
    v4_magic=IPSet.of([IPRange.parse("100.80.0.0-100.80.255.255")]),
    v6_magic=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::ffff")]),
    v4_transit=IPSet.of([IPRange.parse("169.254.128.0-169.254.255.255")]),
    v6_transit=IPSet.of([IPRange.parse("fd7a:115c:a1e0:ab13::-fd7a:115c:a1e0:ab13::ffff")]),
)


class Member(msgspec.Struct, frozen=True):
    """One node of the tailnet file's ``nodes`` (not the daemon's running node)."""

    name: str
    addresses: tuple[IPAddress, ...]
    # Underlay (ip, port); None for a node that others cannot reach first (behind a
    # NAT): its endpoint is learnt from its authenticated datagrams.
    endpoint: tuple[str, int] | None
    public_key: bytes  # the WireGuard public key (32 bytes), ``publicKey``
    user: str | None = None
    tags: tuple[str, ...] = ()
    egress_ips: tuple[IPAddress, ...] = ()
    # Seconds between keepalives this node sends to each peer, 0 = off. The loader
    # fills in the file's default (DEFAULT_KEEPALIVE without an endpoint, else 0).
    persistent_keepalive: int = 0

    def address(self, version: int) -> IPAddress | None:
        """The node's first overlay address of that family."""
        return next((a for a in self.addresses if a.version == version), None)

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)


class NodeAttr(msgspec.Struct, frozen=True):
    target: tuple[str, ...]
    apps: tuple[App, ...] = ()
    pools: Pools | None = None


class Rule(msgspec.Struct, frozen=True):
    """One ACL (``dst`` as "host:ports") or grant (``dst`` hosts, any ports)."""

    src: tuple[str, ...]
    dst: tuple[str, ...]


class Tailnet(msgspec.Struct, frozen=True):
    nodes: tuple[Member, ...]
    tag_owners: dict[str, tuple[str, ...]] = {}
    groups: dict[str, tuple[str, ...]] = {}
    hosts: dict[str, str] = {}
    acls: tuple[Rule, ...] = ()
    grants: tuple[Rule, ...] = ()
    node_attrs: tuple[NodeAttr, ...] = ()

    def node(self, name: str) -> Member | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclass(kw_only=True, eq=False, repr=False)  # equal only to itself, as before
class NodeConfig:
    """One node's conn25 configuration: its apps, pools and the policy's answers, as data."""

    tailnet: Tailnet
    node: Member
    advertise_connector: bool
    apps: tuple[App, ...]
    pools: Pools
    app_users: frozenset[str]  # names of the nodes the policy lets use apps
    _apps_by_name: dict[str, App] = field(init=False)
    _index: DomainIndex = field(init=False)
    _by_address: dict[IPAddress, Member] = field(init=False)

    def __post_init__(self) -> None:
        self._apps_by_name = {a.name: a for a in self.apps}
        # peer_by_address runs per peer API connection and request and per registered
        # item: a dict, not a scan of every node. (The loader refuses an address on two
        # nodes; reversed, the first would win anyway.)
        self._by_address = {a: n for n in reversed(self.tailnet.nodes) for a in n.addresses}
        self._index = DomainIndex()
        for app in self.apps:
            for d in app.domains:
                self._index.add(d, app.name)

    @property
    def configured(self) -> bool:
        return bool(self.apps)

    def app(self, name: str) -> App | None:
        return self._apps_by_name.get(name)

    def serves(self, app: App) -> bool:
        """This node is a connector for ``app``: it advertises and carries one of its tags."""
        return self.advertise_connector and any(t in self.node.tags for t in app.connectors)

    @property
    def own_apps(self) -> tuple[App, ...]:
        return tuple(a for a in self.apps if self.serves(a))

    def apps_for_name(self, qname: str | Sequence[bytes]) -> list[App]:
        """Apps whose domains match ``qname`` (exact beats the longest wildcard).

        ``qname`` is text or, for a name read off the wire, its labels (see
        :meth:`DomainIndex.lookup`); every "is this name an app's" question
        goes through here.
        """
        return [self._apps_by_name[n] for n in self._index.lookup(qname)]

    def mapping_app(self, qname: str | Sequence[bytes]) -> App | None:
        """The app a client maps ``qname`` for, or None.

        None also when this node serves one of the matching apps itself: a
        connector never maps the domains it egresses.
        """
        apps = self.apps_for_name(qname)
        if not apps or any(self.serves(a) for a in apps):
            return None
        return apps[0]

    @property
    def peers(self) -> list[Member]:
        """The other nodes of the tailnet."""
        return [n for n in self.tailnet.nodes if n.name != self.node.name]

    def connector_candidates(self, app: App) -> list[Member]:
        """Peers carrying one of the app's connector tags, in a stable order (by name).

        Whether they actually advertise as connectors is learnt at run time
        (their health endpoint); this is the order to try them in.
        """
        return sorted(
            (n for n in self.peers if any(t in n.tags for t in app.connectors)),
            key=lambda n: n.name,
        )

    def may_use_apps(self, peer: Member) -> bool:
        """The policy lets ``peer`` reach autogroup:internet, so it may use our apps."""
        return peer.name in self.app_users

    def peer_by_address(self, addr: IPAddress) -> Member | None:
        return self._by_address.get(addr)


