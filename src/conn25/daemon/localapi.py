"""The local API on the state dir's unix socket: what ``conn25d status`` reads.

* ``GET /status``: the status document as JSON;
* ``GET /metrics``: the node's counters in the Prometheus text format, and
  metric families with labels (:class:`Labelled`), such as the WireGuard
  peers' (:func:`peer_metrics`): ``conn25d_wireguard_peer_*{peer="NAME"}``.

Access control is the socket file's: whoever may open it may read both.

prometheus_client is imported on the first ``/metrics`` request: with what it
pulls in (http.server, email, wsgiref) it is 2.6 MiB of a connector's memory,
which an unscraped node does without.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from . import http
from .http import Request, Response

if TYPE_CHECKING:
    from prometheus_client.core import Metric

log = logging.getLogger("conn25.daemon.localapi")

STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
METRIC_PREFIX = "conn25d_"
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_:]")


@dataclass(frozen=True, slots=True)
class Labelled:
    """A metric family with labels: one sample per tuple of label values.

    Plain data, so that what provides it needs no prometheus_client (see the
    module docstring); ``name`` is made a Prometheus name as the keys of
    ``metrics()`` are. Label values should come from a small, stable set
    (names from the tailnet file, fixed reasons), never from traffic.
    """

    name: str
    documentation: str
    labels: tuple[str, ...]
    samples: Sequence[tuple[tuple[str, ...], float]]
    gauge: bool = False


# Field of Overlay.peers(), family name, help.
PEER_COUNTERS = (("rxBytes", "wireguard_peer_rx_bytes", "bytes received from the peer"),
                 ("txBytes", "wireguard_peer_tx_bytes", "bytes sent to the peer"))


def peer_metrics(peers: Iterable[Mapping[str, Any]]) -> list[Labelled]:
    """The WireGuard peers (``Overlay.peers()``) as metric families labelled by peer name.

    The name and not the public key: a name is what an operator reads, and the label
    set stays as small and stable as the tailnet file's nodes. Drops are exported for
    every reason the datapath reports, zeros included, so that ``rate()`` sees the
    first drop of a reason.
    """
    peers = list(peers)  # read several times
    out = [
        Labelled(name, help_, ("peer",), [((p["name"],), p.get(field, 0)) for p in peers])
        for field, name, help_ in PEER_COUNTERS
    ]
    out += [
        Labelled("wireguard_peer_latest_handshake_seconds",
                 "Unix time of the latest completed handshake with the peer (0: never)",
                 ("peer",), [((p["name"],), p.get("latestHandshake") or 0) for p in peers],
                 gauge=True),
        Labelled("wireguard_peer_staged", "packets waiting for a session with the peer",
                 ("peer",), [((p["name"],), p.get("staged", 0)) for p in peers], gauge=True),
        Labelled("wireguard_peer_drops", "packets to or from the peer dropped, by reason",
                 ("peer", "reason"),
                 [((p["name"], reason), n) for p in peers
                  for reason, n in sorted(p.get("drops", {}).items())]),
    ]
    return out


class _Snapshot:
    """A Prometheus collector over one snapshot of ``metrics()`` and the labelled families.

    Every key is a counter (exposed with the ``_total`` suffix) unless it is
    one of ``gauges`` (sizes, things in use). Names get the ``conn25d_``
    prefix, and characters Prometheus does not allow become ``_``. A name
    seen before (after that) is left out, with a warning.
    """

    def __init__(self, values: dict[str, int], gauges: Collection[str],
                 labelled: Iterable[Labelled] = ()) -> None:
        self._values = values
        self._gauges = gauges
        self._labelled = labelled

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        seen: set[str] = set()

        def fresh(key: str, gauge: bool) -> str | None:
            name = metric_name(key)
            if not gauge:
                name = name.removesuffix("_total")  # the library adds it back
            if name in seen:
                log.warning("localapi: metric %r clashes with another as %s; left out", key, name)
                return None
            seen.add(name)
            return name

        for key, value in sorted(self._values.items()):
            gauge = key in self._gauges
            if (name := fresh(key, gauge)) is not None:
                family = GaugeMetricFamily if gauge else CounterMetricFamily
                yield family(name, key, value=value)
        for m in self._labelled:
            if (name := fresh(m.name, m.gauge)) is None:
                continue
            metric = (GaugeMetricFamily if m.gauge else CounterMetricFamily)(
                name, m.documentation, labels=m.labels)
            for label_values, sample in m.samples:
                metric.add_metric(list(label_values), sample)
            yield metric


def metric_name(key: str) -> str:
    """``key`` as a Prometheus name (without a counter's ``_total``)."""
    name = _NOT_NAME.sub("_", key)
    return name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name


def render_metrics(values: dict[str, int], gauges: Collection[str] = (),
                   labelled: Iterable[Labelled] = ()) -> bytes:
    """``values`` and ``labelled`` in the Prometheus text exposition format (see
    :class:`_Snapshot`)."""
    import prometheus_client

    return prometheus_client.generate_latest(_Snapshot(values, frozenset(gauges), labelled))


class LocalAPI:
    """Routes of the local API; serve ``handle`` with :func:`conn25.daemon.http.serve_unix`
    or :meth:`run`.

    ``gauges`` names the keys of ``metrics()`` that are not counters;
    ``labelled`` gives the metric families with labels, read with ``metrics()``.
    """

    def __init__(
        self,
        status_document: Callable[[], dict[str, Any]],
        metrics: Callable[[], dict[str, int]],
        *,
        socket_path: str | os.PathLike[str] | None = None,
        gauges: Collection[str] = (),
        labelled: Callable[[], Iterable[Labelled]] | None = None,
    ) -> None:
        self._status_document = status_document
        self._metrics = metrics
        self._socket_path = socket_path
        self._gauges = frozenset(gauges)
        self._labelled = labelled

    async def run(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on ``socket_path`` (or the one given to the constructor) until cancelled.

        The socket file is removed on the way out.
        """
        path = socket_path if socket_path is not None else self._socket_path
        if path is None:
            raise ValueError("LocalAPI.run needs a socket path (argument or constructor)")
        await http.serve_unix(path, self.handle, task_status=task_status)

    async def handle(self, req: Request) -> Response:
        routes = {STATUS_PATH: self._status, METRICS_PATH: self._metrics_text}
        route = routes.get(req.path)
        if route is None:
            return Response.text(404, f"no such endpoint {req.path!r}")
        if req.method not in ("GET", "HEAD"):
            return Response.text(405, "method must be GET", [("Allow", "GET")])
        return route()

    def _status(self) -> Response:
        return Response(200, msgspec.json.encode(self._status_document()))

    def _metrics_text(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        labelled = list(self._labelled()) if self._labelled is not None else []
        text = render_metrics(self._metrics(), self._gauges, labelled)
        return Response(200, text, CONTENT_TYPE_LATEST)
