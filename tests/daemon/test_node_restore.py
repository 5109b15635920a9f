"""The node restores saved assignments against its tailnet's addresses and logs each drop."""

import ipaddress
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from conn25.core.assignments import Assignments
from conn25.core.config import DEFAULT_POOLS, Member
from conn25.daemon.node import ASSIGNMENTS_FILE
from conn25.daemon.node import Node as DaemonNode
from nodekeys import public_key

T0 = 1_700_000_000.0


def row(magic: str, transit: str, domain: str) -> dict:
    return {"magic": magic, "transit": transit, "real": "203.0.113.1", "app": "A",
            "domain": domain, "expiry": T0 + 300}


def test_restore_drops_an_assignment_on_a_peers_address_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    peer = Member("gh-connector-1", (ipaddress.ip_address("100.80.0.9"),), ("192.0.2.2", 41641),
                  public_key("gh-connector-1"))
    (tmp_path / ASSIGNMENTS_FILE).write_text(json.dumps([
        row("100.80.0.1", "169.254.128.1", "good."),
        row("100.80.0.9", "169.254.128.2", "bad."),  # the peer's overlay address
    ]))
    node = SimpleNamespace(
        options=SimpleNamespace(state_path=tmp_path),
        assignments=Assignments(DEFAULT_POOLS),
        now=lambda: T0,
        config=SimpleNamespace(tailnet=SimpleNamespace(nodes=(peer,))),
    )
    node._load_state = lambda *args: DaemonNode._load_state(node, *args)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="conn25d"):
        DaemonNode._restore_assignments(node)  # type: ignore[arg-type]
    assert [a.domain for a in node.assignments] == ["good."]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "100.80.0.9" in warnings[0].getMessage()
    assert "magic IP is a node's address" in warnings[0].getMessage()
    assert (tmp_path / ASSIGNMENTS_FILE).exists()  # not moved aside as a bad file
