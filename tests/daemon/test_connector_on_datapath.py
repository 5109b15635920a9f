"""Every ConnectorTable test of tests/core/test_connector.py again, with the store the
daemon gives its ConnectorTable: the datapath's transit table (no root, no pumps).

The node keeps a connector's mappings there only, so that table must answer
what the core's tests ask: the same mappings, times to the last bit, the same
sweep order (ties in registration time: IPv4 before IPv6, then by address, which
is the order the core's tests expect too), the same snapshots and state.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conn25.core.connector import MappingStore
from conn25.daemon.dataplane import Dataplane, Ids
from conn25.fastpath import Tables


def _core_tests():
    """tests/core/test_connector.py as pytest imports it (by its base name)."""
    name = "test_connector"
    module = sys.modules.get(name)
    if module is None:
        path = Path(__file__).resolve().parents[1] / "core" / "test_connector.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


core = _core_tests()
# What is about the Python store itself, or about no store, stays there.
ONLY_THERE = {"test_packed_store_drops_a_peer_with_its_last_mapping",
              "test_compact_resolution_records_behave_as_a_dict",
              "test_compact_resolution_records_sweep_only_expired_ones_within_the_budget"}
for _name, _fn in vars(core).items():
    if _name.startswith("test_") and _name not in ONLY_THERE and callable(_fn):
        globals()[_name] = _fn

table = core.table  # the fixture, whose tables now get the store below


def datapath_store() -> MappingStore:
    return Dataplane(Tables(), Ids()).connector_store


@pytest.fixture(autouse=True)
def _on_the_datapath(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "make_store", datapath_store)


def test_the_tables_here_are_on_the_datapath():
    t = core.new_table(core.node_config())
    assert type(t.store).__name__ == "ConnectorStore"
