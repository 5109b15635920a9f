"""The node's handling of datapath events, on stand-ins (no root, no datapath): floods of
rejects become counters and summaries, never a log line each (and re-registration still
happens for each, the registrar de-duplicating)."""

from __future__ import annotations

import ipaddress
import logging
import os

import trio
import trio.testing

from conn25.daemon.node import REFUSAL_REASONS, Node, NodeOptions
from conn25.fastpath import DatapathEvent, EventKind, Role

T4 = ipaddress.ip_address("169.254.128.7")


class FakeDatapath:
    """Events once (its event fd readable), then nothing (an fd that never becomes readable)."""

    def __init__(self, events: list[DatapathEvent]) -> None:
        self.events = events
        self.ready = os.pipe()
        self.quiet = os.pipe()
        os.write(self.ready[1], b"x")
        self.event_fd = self.ready[0]

    def read_events(self) -> list[DatapathEvent]:
        events, self.events = self.events, []
        self.event_fd = self.quiet[0]
        return events

    def close(self) -> None:
        for fd in (*self.ready, *self.quiet):
            os.close(fd)


class FakeOverlay:
    """The WireGuard driver's part of the event loop: no handshakes waiting."""

    counters: dict[str, int] = {}

    def handle_handshakes(self) -> None:
        pass


class FakeRegistrar:
    def __init__(self) -> None:
        self.rejected_transits: list[object] = []

    def rejected(self, transit: object) -> None:
        self.rejected_transits.append(transit)

    def counters(self) -> dict[str, int]:
        return {}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_events(events: list[DatapathEvent]) -> tuple[Node, FakeRegistrar, list[str]]:
    node = Node(NodeOptions(tailnet="/nonexistent", hostname="client"))
    node.ids.peer("conn1")
    dp = FakeDatapath(events)
    registrar = FakeRegistrar()
    node.datapath = dp  # type: ignore[assignment]
    node.registrar = registrar  # type: ignore[assignment]
    node.overlay = FakeOverlay()  # type: ignore[assignment]
    handler = Lines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node._read_events)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        dp.close()
    return node, registrar, handler.lines


def test_twenty_thousand_rejects_make_few_log_lines_and_all_are_counted():
    packed = T4.packed
    events = [DatapathEvent(EventKind.REJECT, Role.CLIENT, packed, 1) for _ in range(20000)]
    events += [DatapathEvent(EventKind.UNMAPPED_TRANSIT, Role.CONNECTOR, packed, 1)
               for _ in range(20000)]
    node, registrar, lines = run_events(events)
    assert len(lines) <= 4, lines[:10]
    assert any("conn1" in line and "reject_received" in line for line in lines)
    assert len(registrar.rejected_transits) == 20000  # de-duplication is the registrar's
    metrics = node.metrics()
    assert metrics["refusals_reject_received"] == 20000
    assert metrics["refusals_unmapped_transit"] == 20000


def test_every_refusal_reason_is_in_the_metrics_from_the_start():
    node = Node(NodeOptions(tailnet="/nonexistent", hostname="client"))
    node.registrar = FakeRegistrar()  # type: ignore[assignment]
    metrics = node.metrics()
    assert all(metrics[f"refusals_{r}"] == 0 for r in REFUSAL_REASONS)


def test_a_bad_dns_allow_of_an_embedded_node_is_a_clear_node_error():
    import pytest

    from conn25.daemon.node import NodeError

    node = Node(NodeOptions(tailnet="/nonexistent", hostname="client",
                            dns_allow=("192.0.2.0/24", "192.0.2.1/24")))
    with pytest.raises(NodeError, match="did you mean"):
        node._dns_allow()
    ok = Node(NodeOptions(tailnet="/nonexistent", hostname="client", dns_allow=("192.0.2.0/24",)))
    assert [str(n) for n in ok._dns_allow()] == ["192.0.2.0/24"]
