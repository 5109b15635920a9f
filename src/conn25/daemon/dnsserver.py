"""The old home of the DNS shell, kept for one release as re-exports: the
forwarder is in :mod:`.dns_forwarder`, the server in :mod:`.dns_server`, the
client's app resolver in :mod:`.dns_resolver`, and the wire helpers in
:mod:`conn25.core.dnsquery`. Import from those; this module will go.
"""

from __future__ import annotations

from .dns_forwarder import Forwarder, parse_upstreams, upstreams_from_resolv_conf
from .dns_resolver import ClientResolver
from .dns_server import DNSServer, SourcePolicy, kernel_says_local, parse_dns_allow

__all__ = [
    "ClientResolver",
    "DNSServer",
    "Forwarder",
    "SourcePolicy",
    "kernel_says_local",
    "parse_dns_allow",
    "parse_upstreams",
    "upstreams_from_resolv_conf",
]
