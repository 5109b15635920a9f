"""The local API on its unix socket: status JSON and Prometheus metrics."""

import contextlib
import json
import logging
import subprocess
import sys

import msgspec
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conn25.core.connector import ConnectorState
from conn25.daemon import http
from conn25.daemon.localapi import Labelled, LocalAPI, metric_name, peer_metrics, render_metrics

DOC = {
    "configured": True,
    "apps": [{"name": "GitHub", "domains": []}],
    # Structs from the core encode as they are.
    "connector": ConnectorState(configured=False),
}
METRICS = {"dns_queries": 7, "registration_rejects": 2, "flows.active": 3}


@contextlib.asynccontextmanager
async def serving(api: LocalAPI, path):
    async with trio.open_nursery() as nursery:
        await nursery.start(api.run, path)
        yield
        nursery.cancel_scope.cancel()


def fetch(tmp_path, method: str, target: str, *, doc=lambda: DOC, metrics=lambda: METRICS,
          gauges=("flows.active",), labelled=None) -> tuple[int, bytes]:
    path = tmp_path / "conn25d.sock"
    api = LocalAPI(doc, metrics, gauges=gauges, labelled=labelled)

    async def main():
        async with serving(api, path):
            return await http.request_unix(path, method, target, timeout=5)

    out = trio.run(main)
    assert not path.exists()  # removed on the way out
    return out


def test_status_is_the_status_document_as_json(tmp_path):
    """`conn25d status --json` reads this."""
    status, body = fetch(tmp_path, "GET", "/status")
    assert status == 200
    assert json.loads(body) == {"configured": True, "apps": [{"name": "GitHub", "domains": []}],
                                "connector": {"configured": False}}


def test_metrics_are_prometheus_text_with_counters_and_gauges(tmp_path):
    status, body = fetch(tmp_path, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["conn25d_dns_queries"].type == "counter"
    assert families["conn25d_dns_queries"].samples[0].name == "conn25d_dns_queries_total"
    assert families["conn25d_dns_queries"].samples[0].value == 7
    assert families["conn25d_registration_rejects"].samples[0].value == 2
    # Not a valid character in a name: becomes "_"; named as a gauge: no _total.
    assert families["conn25d_flows_active"].type == "gauge"
    assert families["conn25d_flows_active"].samples[0].value == 3


def test_metric_names_are_prefixed_once_and_sanitised():
    assert metric_name("dns.servfail-count") == "conn25d_dns_servfail_count"
    assert metric_name("conn25d_x") == "conn25d_x"
    assert b"conn25d_x_total 1.0" in render_metrics({"x_total": 1})


def test_clashing_metric_names_keep_one_and_log(caplog):
    caplog.set_level(logging.WARNING, logger="conn25.daemon.localapi")
    text = render_metrics({"a.b": 1, "a_b": 2}).decode()
    assert text.count("\nconn25d_a_b_total ") == 1
    assert "clashes" in caplog.text


def test_unknown_path_is_404(tmp_path):
    assert fetch(tmp_path, "GET", "/nothing")[0] == 404


@pytest.mark.parametrize("target", ["/status", "/metrics"])
def test_other_methods_than_get_are_405(tmp_path, target):
    assert fetch(tmp_path, "POST", target)[0] == 405


def test_failing_status_document_gives_500_and_is_logged(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="conn25.daemon.http")

    def broken() -> dict:
        raise RuntimeError("status bug")

    assert fetch(tmp_path, "GET", "/status", doc=broken)[0] == 500
    assert "status bug" in caplog.text


def test_run_needs_a_socket_path():
    api = LocalAPI(lambda: DOC, lambda: METRICS)
    with pytest.raises(ValueError, match="socket path"):
        trio.run(api.run)


def test_socket_path_may_come_from_the_constructor(tmp_path):
    path = tmp_path / "api.sock"
    api = LocalAPI(lambda: DOC, lambda: METRICS, socket_path=path)

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(api.run)
            status, body = await http.request_unix(path, "GET", "/status", timeout=5)
            nursery.cancel_scope.cancel()
        return status, body

    status, body = trio.run(main)
    assert status == 200 and msgspec.json.decode(body)["configured"] is True


def test_prometheus_client_is_imported_only_when_metrics_are_asked_for():
    """Memory: a node that nobody scrapes does without prometheus_client."""
    code = ("import sys, conn25.daemon.node, conn25.daemon.localapi as l;"
            " a = 'prometheus_client' in sys.modules;"
            " l.render_metrics({'x': 1}); print(a, 'prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


# -- labelled metrics: the WireGuard peers -------------------------------------------------

PRIVATE_KEY = "cGx1bXMgYW5kIHBlYWNoZXMgYXJlIG5vdCBhIGtleSE="  # looks like one, is in no output
PEERS = [
    {"name": "gh-connector-1", "publicKey": "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
     "endpoint": "198.51.100.20:41641", "endpointLearned": 1_700_000_000.5,
     "latestHandshake": 1_700_000_100.25, "handshaking": False, "rxBytes": 1234,
     "txBytes": 5678, "staged": 0, "privateKey": PRIVATE_KEY,
     "drops": {"replay": 3, "auth": 0, "expired": 0, "spoofed": 1, "no_endpoint": 0,
               "staged_overflow": 0}},
    {"name": 'odd "name"\\', "publicKey": "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
     "endpoint": None, "endpointLearned": None, "latestHandshake": None, "handshaking": True,
     "rxBytes": 0, "txBytes": 0, "staged": 4,
     "drops": {"replay": 0, "auth": 0, "expired": 0, "spoofed": 0, "no_endpoint": 2,
               "staged_overflow": 5}},
]


def samples(text: str) -> dict[tuple[str, frozenset], tuple[str, float]]:
    """Every sample of the text format, parsed back: (name, labels) -> (family type, value)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, key
            out[key] = (family.type, s.value)
    return out


def test_the_peers_are_metrics_labelled_by_name(tmp_path):
    status, body = fetch(tmp_path, "GET", "/metrics", labelled=lambda: peer_metrics(PEERS))
    assert status == 200
    got = samples(body.decode())
    c1, odd = "gh-connector-1", 'odd "name"\\'

    def peer(name: str, metric: str, **labels: str) -> tuple[str, float]:
        return got[(f"conn25d_wireguard_peer_{metric}",
                    frozenset({"peer": name, **labels}.items()))]

    assert peer(c1, "rx_bytes_total") == ("counter", 1234)
    assert peer(c1, "tx_bytes_total") == ("counter", 5678)
    assert peer(c1, "latest_handshake_seconds") == ("gauge", 1_700_000_100.25)
    assert peer(odd, "latest_handshake_seconds") == ("gauge", 0)  # never
    assert peer(c1, "staged") == ("gauge", 0) and peer(odd, "staged") == ("gauge", 4)
    assert peer(c1, "drops_total", reason="replay") == ("counter", 3)
    assert peer(c1, "drops_total", reason="spoofed") == ("counter", 1)
    assert peer(odd, "drops_total", reason="staged_overflow") == ("counter", 5)
    # Zeros too, every reason of every peer: rate() sees the first drop.
    drops = {k for k in got if k[0] == "conn25d_wireguard_peer_drops_total"}
    assert len(drops) == 2 * 6 and peer(c1, "drops_total", reason="auth") == ("counter", 0)
    # The flat metrics are still there beside them.
    assert got[("conn25d_dns_queries_total", frozenset())] == ("counter", 7)


def test_peer_labels_are_the_name_only_never_key_material(tmp_path):
    """The label set stays small (names, reasons): no public key, and no private key at all."""
    _, body = fetch(tmp_path, "GET", "/metrics", labelled=lambda: peer_metrics(PEERS))
    text = body.decode()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("conn25d_wireguard_peer_"):
            for s in family.samples:
                assert set(s.labels) <= {"peer", "reason"}, s
    assert "publicKey" not in text and PRIVATE_KEY not in text
    assert not any(p["publicKey"] in text for p in PEERS)


def test_no_peers_give_families_without_samples():
    got = samples(render_metrics({}, labelled=peer_metrics([])).decode())
    assert got == {}


def test_labelled_metrics_that_clash_with_a_flat_one_are_left_out_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="conn25.daemon.localapi")
    clash = Labelled("x", "a labelled x", ("peer",), [(("a",), 9)], gauge=True)
    got = samples(render_metrics({"x": 1}, gauges={"x"}, labelled=[clash]).decode())
    assert got == {("conn25d_x", frozenset()): ("gauge", 1)}
    assert "clashes" in caplog.text


def test_without_a_labelled_callable_metrics_are_the_flat_ones(tmp_path):
    _, body = fetch(tmp_path, "GET", "/metrics")
    assert "wireguard_peer" not in body.decode()
    assert ("conn25d_dns_queries_total", frozenset()) in samples(body.decode())
