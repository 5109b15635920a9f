"""Policy questions about a loaded tailnet: which nodes a selector names, who may use apps.

Selectors are the strings of ``nodeAttrs[].target``, ``acls[].src`` and
``grants[].src``. :func:`kind` classifies one without looking at the
tailnet, so that ``conn25.core.tailnet`` validates with the same rules that
:func:`selector_matches` applies.
"""

from __future__ import annotations

import ipaddress

from .config import Member, Tailnet
from .iprange import IPNetwork

INTERNET = "autogroup:internet"
# Autogroups that select nodes; autogroup:internet is a destination only.
NODE_AUTOGROUPS = ("autogroup:member", "autogroup:tagged")


def parse_network(text: str) -> IPNetwork | None:
    """``text`` as an IP prefix (a bare address is a /32 or /128), or None."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def kind(selector: str) -> str:
    """One of "all", "autogroup", "tag", "group", "user", "ip" or "name".

    "name" is a node name or a ``hosts`` alias; which one only the tailnet knows.
    """
    if selector == "*":
        return "all"
    for prefix in ("autogroup", "tag", "group"):
        if selector.startswith(prefix + ":"):
            return prefix
    if "@" in selector:
        return "user"
    if parse_network(selector) is not None:
        return "ip"
    return "name"


def split_dst(dst: str) -> tuple[str, str]:
    """Split an ACL destination ``"host:ports"`` into host and ports.

    The ports follow the last colon, so IPv6 hosts need no brackets
    (``"fd7a:115c:a1e0::1:22"``), but brackets are accepted
    (``"[fd7a:115c:a1e0::1]:22"``). ValueError when there is no port part.
    """
    host, sep, ports = dst.rpartition(":")
    if not sep or not host or not ports:
        raise ValueError(f"destination {dst!r} is not \"host:ports\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, ports


def _in_network(node: Member, net: IPNetwork | None) -> bool:
    return net is not None and any(a in net for a in node.addresses)


def selector_matches(tailnet: Tailnet, selector: str, node: Member) -> bool:
    """Whether ``selector`` names ``node`` in ``tailnet``."""
    match kind(selector):
        case "all":
            return True
        case "autogroup":
            if selector == "autogroup:member":
                return not node.is_tagged
            return selector == "autogroup:tagged" and node.is_tagged
        case "tag":
            return selector in node.tags
        case "group":
            return node.user is not None and node.user in tailnet.groups.get(selector, ())
        case "user":
            return node.user == selector
        case "ip":
            return _in_network(node, parse_network(selector))
        case _:
            if node.name == selector:
                return True
            host = tailnet.hosts.get(selector)
            return host is not None and _in_network(node, parse_network(host))


def may_reach_internet(tailnet: Tailnet, node: Member) -> bool:
    """The policy lets ``node`` reach autogroup:internet (on any port).

    That is what entitles a client to use an app through a connector.
    """
    for rule in tailnet.acls:
        if any(split_dst(d)[0] == INTERNET for d in rule.dst) and any(
            selector_matches(tailnet, s, node) for s in rule.src
        ):
            return True
    return any(
        INTERNET in rule.dst and any(selector_matches(tailnet, s, node) for s in rule.src)
        for rule in tailnet.grants
    )
