"""What the trio components of a node may use of the node (a Protocol, so each
component can be tested with a small stand-in and the node stays the only
place that wires things together)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from ..core.assignments import Assignments
from ..core.config import NodeConfig
from ..core.connector import ConnectorTable, Mapping
from ..fastpath import Datapath
from .dataplane import Dataplane

if TYPE_CHECKING:
    from .dnsserver import Forwarder
    from .registration import Registrar


class NodeContext(Protocol):
    config: NodeConfig
    assignments: Assignments
    connector: ConnectorTable | None  # None unless the node advertises as a connector
    datapath: Datapath
    dataplane: Dataplane  # every write to the datapath's tables
    forwarder: Forwarder
    registrar: Registrar
    peerapi_port: int  # every node serves the peer API on this port of its overlay addresses

    def now(self) -> float:
        """Wall-clock seconds, the time base of assignments and connector mappings."""
        ...

    def install_connector_mappings(self, mappings: Iterable[Mapping]) -> None:
        """Put accepted (peer, transit) -> real mappings into the datapath."""
        ...

    def assignments_changed(self) -> None:
        """Assignments were made or changed: persist them (debounced by the node)."""
        ...

    def metrics(self) -> dict[str, int]:
        """Counters of the control plane (DNS, registration, reloads, ...)."""
        ...
