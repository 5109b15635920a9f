"""A node's view of a loaded tailnet: which node attributes target it, its pools,
and the :class:`~conn25.core.config.NodeConfig` its client and connector run on.

``conn25.core.config`` holds the data these are answers about; the selector
and rule questions they ask are :mod:`conn25.core.acl`'s. Sans-IO like the
rest of the core.
"""

from __future__ import annotations

from . import acl
from .config import DEFAULT_POOLS, App, Member, NodeConfig, Pools, Tailnet

__all__ = ["attrs_for", "node_config", "pools_for"]


def attrs_for(tailnet: Tailnet, node: Member) -> tuple[list[App], Pools]:
    """The apps and pools of the node attributes that target ``node``."""
    apps: list[App] = []
    pools: Pools | None = None
    for attr in tailnet.node_attrs:
        if not any(acl.selector_matches(tailnet, sel, node) for sel in attr.target):
            continue
        apps.extend(a for a in attr.apps if a not in apps)
        if attr.pools is not None:
            pools = attr.pools  # tailnet.load rejects two pool attributes for one node
    return apps, pools if pools is not None else DEFAULT_POOLS


def pools_for(tailnet: Tailnet, node: Member) -> Pools:
    """The pools ``node`` allocates from (a connector checks a client's transit IPs here)."""
    return attrs_for(tailnet, node)[1]


def node_config(tailnet: Tailnet, name: str, advertise_connector: bool = False) -> NodeConfig:
    """The view of node ``name``; KeyError when there is no such node."""
    node = tailnet.node(name)
    if node is None:
        raise KeyError(f"no node named {name!r} in the tailnet file")
    apps, pools = attrs_for(tailnet, node)
    return NodeConfig(
        tailnet=tailnet,
        node=node,
        advertise_connector=advertise_connector,
        apps=tuple(apps),
        pools=pools,
        # Reaching autogroup:internet is what entitles a peer to use apps.
        app_users=frozenset(n.name for n in tailnet.nodes if acl.may_reach_internet(tailnet, n)),
    )
