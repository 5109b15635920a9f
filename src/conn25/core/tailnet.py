"""Reading a tailnet file (Tailscale policy syntax in HuJSON, plus ``nodes``).

:func:`load` checks the whole file and either returns a :class:`Tailnet` or
raises :class:`TailnetError` with every problem found, one per line, each
starting with the source name and the place as a JSON path, e.g.
``tailnet.hujson: nodes[2] ("laptop").addresses[1]: ...``.

Decisions beyond upstream:

* A node has either a user or tags, not both: upstream, a tagged device has
  no user identity, and ``autogroup:member`` must not match a connector.
  A node may have neither (an untagged node that no user owns).
* A node has at most one overlay address per family: the peer API and the
  connector's tables key a peer by "its address of the transit IP's family".
* Every node has a WireGuard public key of its own (``publicKey``, required,
  unique); ``endpoint`` is optional (a node behind a NAT has none), and
  ``persistentKeepalive`` defaults to 25 s for a node without one, else off.
  No message quotes a key: a private key pasted by mistake stays off terminals.
* Pools: within one node's view a magic and a transit pool must not
  overlap, and since transit IPs travel between nodes, no magic pool of any
  attribute may overlap a transit pool of any other; no pool may hold a node
  address. The default pools count when some node gets no pool attribute.
* Policy sections that conn25d does not use (``autoApprovers``, ``ssh``,
  ``tests`` ...) are accepted and ignored, so a real policy file loads;
  other unknown keys are errors, and so is a key given twice in one object.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import json5

from . import acl, dnsname
from .config import (
    APP_ATTRS,
    DEFAULT_KEEPALIVE,
    DEFAULT_POOLS,
    DEFAULT_PORT,
    POOL_ATTR,
    App,
    Member,
    NodeAttr,
    Pools,
    Rule,
    Tailnet,
)
from .iprange import IPAddress, IPRange, IPSet, parse_address
from .wireguard import keys as wgkeys

SECTIONS = ("tagOwners", "groups", "hosts", "acls", "grants", "nodeAttrs", "nodes")
# Tailscale policy sections that mean nothing to conn25d.
IGNORED_SECTIONS = (
    "autoApprovers", "ssh", "sshTests", "tests", "postures", "defaultSrcPosture", "ipsets",
    "derpMap", "disableIPv4", "OneCSGNATRoute", "randomizeClientPort",
)
POOL_KEYS = tuple(key for key, _ in Pools().named())

_TAG = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9_-]*$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_JSON5_ERROR = re.compile(r"^<string>:(\d+) (.*) at column (\d+)$")
KEEPALIVE_MAX = 65535  # WireGuard's persistent keepalive is a 16-bit number of seconds
_MISSING_HINTS = {
    "publicKey": "the node's WireGuard public key; on the node, \"conn25d up\" creates "
                 "its key and prints the value to put here",
}


class TailnetError(Exception):
    """A tailnet file that cannot be used; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors)
        self.errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


def load_bytes(data: bytes, source: str = "<tailnet>") -> Tailnet:
    """Parse and check a tailnet file's bytes (UTF-8); TailnetError lists every problem,
    each starting with ``source``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TailnetError([f"{source}: not UTF-8 text (byte {e.start})"]) from None
    return load(text, source)


def load(text: str, source: str = "<tailnet>") -> Tailnet:
    """Parse and check a tailnet file's text; TailnetError lists every problem."""
    try:
        doc = json5.loads(text, object_pairs_hook=_Object.from_pairs)
    except ValueError as e:
        raise TailnetError([f"{source}:{_syntax_error(str(e))}"]) from None
    loader = _Loader()
    tailnet = loader.load(doc)
    if loader.errors:
        raise TailnetError([f"{source}: {e}" for e in loader.errors])
    assert tailnet is not None
    return tailnet


def find_node(text: str, name: str) -> tuple[str, object] | None:
    """The place of the node named ``name`` in a tailnet file's text (as in error messages,
    e.g. ``nodes[1] ("laptop")``) and the value of its ``publicKey`` (None when absent),
    checking nothing else; None when the text does not parse or has no such node.

    For ``conn25d up`` telling a new node which key to put where while the file may
    still be incomplete (the node's own ``publicKey`` missing makes it invalid).
    """
    try:
        doc = json5.loads(text)
    except ValueError:
        return None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    for i, node in enumerate(nodes if isinstance(nodes, list) else ()):
        if isinstance(node, dict) and node.get("name") == name:
            return f"{_idx('nodes', i)} ({_q(name)})", node.get("publicKey")
    return None


def _syntax_error(message: str) -> str:
    """json5's "<string>:LINE MSG at column COL" as "LINE:COL: syntax error: MSG"."""
    if m := _JSON5_ERROR.match(message):
        return f"{m[1]}:{m[3]}: syntax error: {m[2]}"
    return f"1:1: syntax error: {message}"


class _Object(dict[str, Any]):
    """A JSON object that remembers keys given more than once (the last value wins)."""

    duplicates: list[str]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, Any]]) -> _Object:
        obj = cls()
        obj.duplicates = []
        for k, v in pairs:
            if k in obj and k not in obj.duplicates:
                obj.duplicates.append(k)
            obj[k] = v
        return obj


def _key(path: str, key: str) -> str:
    if _IDENT.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _idx(path: str, i: int) -> str:
    return f"{path}[{i}]"


def _what(value: object) -> str:
    """How to name a JSON value's type in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _q(text: str) -> str:
    return json.dumps(text)


class _Loader:
    """One pass over a parsed document, collecting errors as it goes."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.tag_owners: dict[str, tuple[str, ...]] = {}
        self.groups: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, str] = {}
        self.node_names: set[str] = set()
        self.addresses: dict[IPAddress, str] = {}  # every node address, with its place
        # (place, kind, range) for every pool range: kind is a POOL_KEYS name.
        self.pool_ranges: list[tuple[str, str, IPRange]] = []
        self.pool_attrs: list[tuple[str, tuple[str, ...]]] = []  # (place, target)

    def error(self, place: str, message: str) -> None:
        self.errors.append(f"{place}: {message}" if place else message)

    # -- shapes -----------------------------------------------------------

    def obj(self, value: object, place: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.error(place, f"expected an object, got {_what(value)}")
        return None

    def lst(self, value: object, place: str, nonempty: bool = False) -> list[Any] | None:
        if not isinstance(value, list):
            self.error(place, f"expected a list, got {_what(value)}")
            return None
        if nonempty and not value:
            self.error(place, "must not be empty")
        return value

    def objects(self, value: object, place: str) -> Iterator[tuple[dict[str, Any], str]]:
        """Each object of the list ``value`` with its place; anything else is reported."""
        for i, item in enumerate(self.lst(value, place) or []):
            item_place = _idx(place, i)
            if (obj := self.obj(item, item_place)) is not None:
                yield obj, item_place

    def string(self, value: object, place: str) -> str | None:
        if isinstance(value, str):
            return value
        self.error(place, f"expected a string, got {_what(value)}")
        return None

    def strings(
        self, value: object, place: str, nonempty: bool = False
    ) -> list[tuple[str, str]]:
        """The strings of a list, each with its place; other elements are errors."""
        items = self.lst(value, place, nonempty)
        out: list[tuple[str, str]] = []
        for i, item in enumerate(items or ()):
            if (s := self.string(item, _idx(place, i))) is not None:
                out.append((_idx(place, i), s))
        return out

    def fields(
        self,
        obj: dict[str, Any],
        place: str,
        required: Iterable[str],
        optional: Iterable[str] = (),
        ignored: Iterable[str] = (),
        hints: dict[str, str] | None = None,
    ) -> None:
        """Missing required keys (with ``hints[key]`` when given) and unknown keys are
        errors."""
        required = tuple(required)
        known = required + tuple(optional) + tuple(ignored)
        for k in required:
            if k not in obj:
                why = f" ({hints[k]})" if hints and k in hints else ""
                self.error(place, f"missing {_q(k)}{why}")
        for k in obj:
            if k not in known:
                hint = difflib.get_close_matches(k, known, n=1)
                also = f" (did you mean {_q(hint[0])}?)" if hint else ""
                self.error(_key(place, k), f"unknown key{also}; expected one of "
                           + ", ".join(_q(x) for x in known))

    def duplicate_keys(self, value: object, place: str) -> None:
        if isinstance(value, _Object):
            for k in value.duplicates:
                self.error(_key(place, k), "given more than once")
            for k, v in value.items():
                self.duplicate_keys(v, _key(place, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.duplicate_keys(v, _idx(place, i))

    # -- names --------------------------------------------------------------

    def tag(self, tag: str, place: str) -> bool:
        if not _TAG.match(tag):
            self.error(place, f"{_q(tag)} is not a valid tag (tag:name)")
            return False
        if tag not in self.tag_owners:
            self.error(place, f"tag {_q(tag)} has no tagOwners entry")
            return False
        return True

    def selector(self, sel: str, place: str, destination: bool = False) -> None:
        """Check a node selector; ``destination`` also allows autogroup:internet."""
        match acl.kind(sel):
            case "autogroup":
                allowed = acl.NODE_AUTOGROUPS + ((acl.INTERNET, "autogroup:self")
                                                 if destination else ())
                if sel not in allowed:
                    self.error(place, f"{_q(sel)} is not allowed here; use one of "
                               + ", ".join(_q(a) for a in allowed))
            case "tag":
                self.tag(sel, place)
            case "group":
                if sel not in self.groups:
                    self.error(place, f"group {_q(sel)} is not defined in groups")
            case "name":
                if sel not in self.node_names and sel not in self.hosts:
                    self.error(place, f"{_q(sel)} is not a node name, host, tag, group, "
                               "user, IP address or CIDR")

    # -- sections -------------------------------------------------------------

    def load(self, doc: object) -> Tailnet | None:
        self.duplicate_keys(doc, "")
        root = self.obj(doc, "(top level)")
        if root is None:
            return None
        for k in root:
            if k not in SECTIONS and k not in IGNORED_SECTIONS:
                hint = difflib.get_close_matches(k, SECTIONS + IGNORED_SECTIONS, n=1)
                also = f" (did you mean {_q(hint[0])}?)" if hint else ""
                self.error(_key("", k), f"unknown section{also}")
        if "nodes" not in root:
            self.error("nodes", "missing: the file must list the tailnet's nodes")
        # Order matters: selectors refer to tags, groups, hosts and node names.
        self.load_tag_owners(root.get("tagOwners", {}))
        self.load_groups(root.get("groups", {}))
        self.check_owners()
        self.load_hosts(root.get("hosts", {}))
        nodes = self.load_nodes(root.get("nodes", []))
        acls = self.load_acls(root.get("acls", []))
        grants = self.load_grants(root.get("grants", []))
        node_attrs = self.load_node_attrs(root.get("nodeAttrs", []))
        tailnet = Tailnet(
            nodes=tuple(n for _, n in nodes),
            tag_owners=self.tag_owners,
            groups=self.groups,
            hosts=self.hosts,
            acls=tuple(acls),
            grants=tuple(grants),
            node_attrs=tuple(node_attrs),
        )
        self.check_pools(tailnet, nodes)
        return tailnet

    def load_tag_owners(self, value: object) -> None:
        section = self.obj(value, "tagOwners") or {}
        for tag, owners in section.items():
            place = _key("tagOwners", tag)
            if not _TAG.match(tag):
                self.error(place, f"{_q(tag)} is not a valid tag (tag:name)")
            self.tag_owners[tag] = tuple(s for _, s in self.strings(owners, place))

    def load_groups(self, value: object) -> None:
        section = self.obj(value, "groups") or {}
        for group, members in section.items():
            place = _key("groups", group)
            if acl.kind(group) != "group":
                self.error(place, f"{_q(group)} is not a group name (group:name)")
            ok = []
            for p, member in self.strings(members, place):
                if acl.kind(member) != "user":
                    self.error(p, f"{_q(member)} is not a user (name@domain); "
                               "groups list users only")
                else:
                    ok.append(member)
            self.groups[group] = tuple(ok)

    def check_owners(self) -> None:
        for tag, owners in self.tag_owners.items():
            for i, owner in enumerate(owners):
                if acl.kind(owner) in ("tag", "group"):
                    self.selector(owner, _idx(_key("tagOwners", tag), i))

    def load_hosts(self, value: object) -> None:
        section = self.obj(value, "hosts") or {}
        for name, addr in section.items():
            place = _key("hosts", name)
            if acl.kind(name) != "name":
                self.error(place, f"{_q(name)} cannot be a host name (it reads as "
                           f"a {acl.kind(name)} selector)")
                continue
            if (text := self.string(addr, place)) is None:
                continue
            if acl.parse_network(text) is None:
                self.error(place, f"{_q(text)} is not an IP address or CIDR")
                continue
            self.hosts[name] = text

    def load_nodes(self, value: object) -> list[tuple[str, Member]]:
        """The nodes, each with its place for later messages."""
        items = self.lst(value, "nodes") or []
        names: dict[str, str] = {}
        endpoints: dict[tuple[str, int], str] = {}
        public_keys: dict[bytes, str] = {}
        # Names first: selectors anywhere may name any node.
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                self.node_names.add(item["name"])
        out: list[tuple[str, Member]] = []
        for i, item in enumerate(items):
            place = _idx("nodes", i)
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                place += f" ({_q(item['name'])})"
            if (obj := self.obj(item, place)) is None:
                continue
            self.fields(obj, place, ("name", "addresses", "publicKey"),
                        ("endpoint", "persistentKeepalive", "user", "tags", "egressIPs"),
                        hints=_MISSING_HINTS)
            name = self.node_name(obj["name"], _key(place, "name"), names) \
                if "name" in obj else None
            user = self.node_user(obj["user"], _key(place, "user")) if "user" in obj else None
            tags = [t for p, t in self.strings(obj.get("tags", []), _key(place, "tags"))
                    if self.tag(t, p)]
            if user is not None and obj.get("tags"):
                self.error(place, "has both a user and tags; a tagged node has no user "
                           "identity, so give one or the other")
            addrs = self.node_addresses(obj.get("addresses", []), _key(place, "addresses"),
                                        nonempty="addresses" in obj)
            endpoint = self.endpoint(obj["endpoint"], _key(place, "endpoint"), endpoints) \
                if "endpoint" in obj else None
            egress = []
            for p, text in self.strings(obj.get("egressIPs", []), _key(place, "egressIPs")):
                try:
                    egress.append(parse_address(text))
                except ValueError as e:
                    self.error(p, str(e))
            public_key = self.public_key(obj["publicKey"], _key(place, "publicKey"),
                                         public_keys) if "publicKey" in obj else None
            keepalive = self.keepalive(obj["persistentKeepalive"],
                                       _key(place, "persistentKeepalive")) \
                if "persistentKeepalive" in obj else None
            if keepalive is None:
                # Without an endpoint of its own the node must make contact and keep
                # its NAT open; a node others can reach needs no keepalives.
                keepalive = DEFAULT_KEEPALIVE if "endpoint" not in obj else 0
            # Kept even when broken (the file is rejected anyway) so that the
            # whole-file checks still see its name, tags and addresses.
            out.append((place, Member(name=name or "", addresses=tuple(addrs),
                                    endpoint=endpoint, public_key=public_key or b"",
                                    user=user, tags=tuple(tags), egress_ips=tuple(egress),
                                    persistent_keepalive=keepalive)))
        return out

    def node_name(self, value: object, place: str, seen: dict[str, str]) -> str | None:
        if (name := self.string(value, place)) is None:
            return None
        if not _NODE_NAME.match(name):
            self.error(place, f"{_q(name)} is not a valid node name (letters, digits and "
                       "inner hyphens, at most 63)")
            return None
        if name in seen:
            self.error(place, f"duplicate node name {_q(name)} (also {seen[name]})")
        else:
            seen[name] = place
        return name

    def node_user(self, value: object, place: str) -> str | None:
        if (user := self.string(value, place)) is None:
            return None
        if acl.kind(user) != "user":
            self.error(place, f"{_q(user)} is not a user (name@domain)")
            return None
        return user

    def node_addresses(self, value: object, place: str, nonempty: bool) -> list[IPAddress]:
        out: list[IPAddress] = []
        for p, text in self.strings(value, place, nonempty):
            try:
                addr = parse_address(text)
            except ValueError as e:
                self.error(p, str(e))
                continue
            if addr in self.addresses:
                self.error(p, f"duplicate address {addr} (also {self.addresses[addr]})")
                continue
            if any(a.version == addr.version for a in out):
                self.error(p, f"second IPv{addr.version} address; a node has at most one "
                           "overlay address per family")
                continue
            self.addresses[addr] = p
            out.append(addr)
        return out

    def endpoint(
        self, value: object, place: str, seen: dict[tuple[str, int], str]
    ) -> tuple[str, int] | None:
        if (text := self.string(value, place)) is None:
            return None
        try:
            endpoint = parse_endpoint(text)
        except ValueError as e:
            self.error(place, str(e))
            return None
        if endpoint in seen:
            self.error(place, f"duplicate endpoint {_q(text)} (also {seen[endpoint]})")
            return None
        seen[endpoint] = place
        return endpoint

    def public_key(self, value: object, place: str, seen: dict[bytes, str]) -> bytes | None:
        """A node's WireGuard public key. Messages never quote the value: a private key
        pasted here by mistake must not reach a log or a terminal."""
        if (text := self.string(value, place)) is None:
            return None
        try:
            key = wgkeys.decode(text)
        except ValueError as e:
            self.error(place, f"{e} (\"conn25d pubkey < private.key\" prints a node's key)")
            return None
        if key in seen:
            self.error(place, f"the same public key as {seen[key]}; every node needs a key "
                       "pair of its own")
            return None
        seen[key] = place
        return key

    def keepalive(self, value: object, place: str) -> int | None:
        """``persistentKeepalive``: whole seconds, 0 (off) to 65535 as in WireGuard."""
        if isinstance(value, bool) or not isinstance(value, int):
            got = repr(value) if isinstance(value, float) else _what(value)
            self.error(place, f"expected whole seconds (0 to {KEEPALIVE_MAX}, 0 = off), "
                       f"got {got}")
            return None
        if not 0 <= value <= KEEPALIVE_MAX:
            self.error(place, f"{value} is out of range: 0 to {KEEPALIVE_MAX} seconds (0 = off)")
            return None
        return value

    def load_acls(self, value: object) -> list[Rule]:
        out: list[Rule] = []
        for obj, place in self.objects(value, "acls"):
            self.fields(obj, place, ("action", "src", "dst"), ignored=("proto",))
            action = obj.get("action", "accept")
            if self.string(action, _key(place, "action")) is not None and action != "accept":
                self.error(_key(place, "action"), f"{_q(action)} is not supported; "
                           "policy rules only \"accept\"")
            src = self.selectors(obj, "src", place)
            dst = []
            for p, d in self.strings(obj.get("dst", []), _key(place, "dst"), "dst" in obj):
                if self.acl_destination(d, p):
                    dst.append(d)
            out.append(Rule(src=src, dst=tuple(dst)))
        return out

    def acl_destination(self, dst: str, place: str) -> bool:
        if acl.kind(dst) in ("autogroup", "tag", "group") and dst.count(":") == 1:
            self.error(place, f"{_q(dst)} has no ports; write {_q(dst + ':*')}")
            return False
        try:
            host, ports = acl.split_dst(dst)
        except ValueError as e:
            self.error(place, str(e))
            return False
        n_errors = len(self.errors)
        self.selector(host, place, destination=True)
        for part in ports.split(","):
            if part != "*" and not _valid_port_range(part):
                self.error(place, f"{_q(ports)} are not ports (\"*\", \"22\", \"80,443\" "
                           "or \"1000-2000\")")
                break
        return len(self.errors) == n_errors

    def load_grants(self, value: object) -> list[Rule]:
        out: list[Rule] = []
        for obj, place in self.objects(value, "grants"):
            self.fields(obj, place, ("src", "dst"), ignored=("ip", "app", "srcPosture", "via"))
            src = self.selectors(obj, "src", place)
            dst = self.selectors(obj, "dst", place, destination=True)
            out.append(Rule(src=src, dst=dst))
        return out

    def selectors(
        self, obj: dict[str, Any], key: str, place: str, destination: bool = False
    ) -> tuple[str, ...]:
        """The selector list ``obj[key]`` (a missing key is reported elsewhere)."""
        out = []
        for p, sel in self.strings(obj.get(key, []), _key(place, key), key in obj):
            self.selector(sel, p, destination)
            out.append(sel)
        return tuple(out)

    def load_node_attrs(self, value: object) -> list[NodeAttr]:
        apps: dict[str, tuple[App, str]] = {}  # by name: first definition and its place
        out: list[NodeAttr] = []
        for obj, place in self.objects(value, "nodeAttrs"):
            self.fields(obj, place, ("target",), ("app",), ignored=("attr",))
            target = self.selectors(obj, "target", place)
            attr_apps: list[App] = []
            pools: Pools | None = None
            caps = self.obj(obj.get("app", {}), _key(place, "app")) or {}
            for cap, cap_value in caps.items():
                cap_place = _key(_key(place, "app"), cap)
                if cap in APP_ATTRS:
                    for j, app_value in enumerate(self.lst(cap_value, cap_place) or []):
                        app = self.app(app_value, _idx(cap_place, j), apps)
                        if app is not None and app not in attr_apps:
                            attr_apps.append(app)
                elif cap == POOL_ATTR:
                    pools = self.pools(cap_value, cap_place)
                    self.pool_attrs.append((cap_place, target))
                elif cap.startswith("tailscale.com/app-connector"):
                    self.error(cap_place, "unknown app connector attribute; expected one of "
                               + ", ".join(_q(a) for a in (*APP_ATTRS, POOL_ATTR)))
            out.append(NodeAttr(target=target, apps=tuple(attr_apps), pools=pools))
        return out

    def app(self, value: object, place: str, seen: dict[str, tuple[App, str]]) -> App | None:
        """One app definition; an equal earlier definition of the same name is reused."""
        if (obj := self.obj(value, place)) is None:
            return None
        n_errors = len(self.errors)
        self.fields(obj, place, ("name", "connectors", "domains"), ignored=("routes",))
        name = self.string(obj["name"], _key(place, "name")) if "name" in obj else None
        if name == "":
            self.error(_key(place, "name"), "must not be empty")
        connectors: list[str] = []
        for p, c in self.strings(obj.get("connectors", []), _key(place, "connectors"),
                                 nonempty="connectors" in obj):
            if acl.kind(c) != "tag":
                self.error(p, f"connector ({_q(c)}) must be a tag")
            elif self.tag(c, p) and c not in connectors:
                connectors.append(c)
        domains: list[str] = []
        for p, d in self.strings(obj.get("domains", []), _key(place, "domains"),
                                 nonempty="domains" in obj):
            try:
                fqdn = dnsname.normalize(d)
            except ValueError as e:
                self.error(p, str(e))
                continue
            if fqdn == ".":
                self.error(p, f"{_q(d)} is not a domain name")
            elif fqdn not in domains:
                domains.append(fqdn)
        if len(self.errors) != n_errors or not name:
            return None
        app = App(name=name, domains=tuple(domains), connectors=tuple(connectors))
        if name not in seen:
            seen[name] = (app, place)
            return app
        first, first_place = seen[name]
        if set(first.domains) == set(app.domains) and set(first.connectors) == set(
            app.connectors
        ):
            return first
        self.error(_key(place, "name"), f"app {_q(name)} is already defined differently "
                   f"at {first_place}")
        return None

    def pools(self, value: object, place: str) -> Pools | None:
        items = self.lst(value, place)
        if items is None:
            return None
        if len(items) != 1:
            self.error(place, f"expected a list with one pools object, got {len(items)} items")
            return None
        place = _idx(place, 0)
        if (obj := self.obj(items[0], place)) is None:
            return None
        n_errors = len(self.errors)
        self.fields(obj, place, (), POOL_KEYS)
        sets: dict[str, IPSet] = {}
        for key in POOL_KEYS:
            version = 4 if key.startswith("v4") else 6
            ranges = []
            for p, text in self.strings(obj.get(key, []), _key(place, key)):
                try:
                    r = IPRange.parse(text)
                except ValueError as e:
                    self.error(p, str(e))
                    continue
                if r.version != version:
                    self.error(p, f"{_q(text)} is IPv{r.version}; {key} takes IPv{version} "
                               "ranges")
                    continue
                ranges.append(r)
                self.pool_ranges.append((p, key, r))
            sets[key] = IPSet.of(ranges)
        pools = Pools(v4_magic=sets["v4MagicIPPool"], v6_magic=sets["v6MagicIPPool"],
                      v4_transit=sets["v4TransitIPPool"], v6_transit=sets["v6TransitIPPool"])
        if len(self.errors) != n_errors:
            return None
        for version in (4, 6):
            if bool(pools.magic(version)) != bool(pools.transit(version)):
                self.error(place, f"v{version}MagicIPPool and v{version}TransitIPPool must "
                           "be given together")
        if not any(s for _, s in pools.named()):
            self.error(place, "no pools given")
        return pools if len(self.errors) == n_errors else None

    # -- whole-file checks ------------------------------------------------------

    def check_pools(self, tailnet: Tailnet, nodes: list[tuple[str, Member]]) -> None:
        """One pool attribute per node; pools clear of each other and of node addresses."""
        without: list[str] = []
        for place, node in nodes:
            applying = [p for p, target in self.pool_attrs
                        if any(acl.selector_matches(tailnet, s, node) for s in target)]
            if len(applying) > 1:
                self.error(place, f"{len(applying)} pool attributes apply to this node: "
                           + " and ".join(applying))
            elif not applying:
                without.append(node.name)
        ranges = list(self.pool_ranges)
        if without:
            place = f"the default pools, used by {_q(without[0])} (no {POOL_ATTR} applies)"
            ranges += [(place, key, r) for key, pool in DEFAULT_POOLS.named() for r in pool]
        for i, (place, key, r) in enumerate(ranges):
            for other_place, other_key, other in ranges[i + 1:]:
                if ("Magic" in key) != ("Magic" in other_key) and r.overlaps(other):
                    self.error(place, f"{key} {r} overlaps {other_key} {other} at {other_place}")
        for addr, addr_place in self.addresses.items():
            for place, key, r in ranges:
                if addr in r:
                    self.error(addr_place, f"{addr} lies in {key} {r} at {place}")


def _valid_port_range(text: str) -> bool:
    lo, sep, hi = text.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        return False
    first, last = int(lo), int(hi) if sep else int(lo)
    return 0 <= first <= last <= 65535


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``"ip:port"``, ``"[v6]:port"`` or a bare address (port ``default_port``) as (ip, port).

    An IPv6 address with a port needs brackets: without them the port would
    read as the address's last group.
    """
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{_q(text)} is not \"ip:port\" or \"[ipv6]:port\"")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    try:
        addr = parse_address(host)
    except ValueError:
        raise ValueError(f"{_q(text)} is not \"ip:port\" or \"[ipv6]:port\" "
                         f"({_q(host)} is not an IP address)") from None
    if not port_text and text.endswith(":"):
        raise ValueError(f"{_q(text)} has an empty port")
    if port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"{_q(text)} has a bad port {_q(port_text)} (1-65535)")
    return str(addr), int(port_text) if port_text else default_port
