"""The local API on the state dir's unix socket: what ``conn25d status`` reads.

* ``GET /status``: the status document as JSON;
* ``GET /metrics``: the node's counters in the Prometheus text format.

Access control is the socket file's: whoever may open it may read both.

prometheus_client is imported on the first ``/metrics`` request: with what it
pulls in (http.server, email, wsgiref) it is 2.6 MiB of a connector's memory,
which an unscraped node does without.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection, Iterator
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


class _Snapshot:
    """A Prometheus collector over one snapshot of ``metrics()``.

    Every key is a counter (exposed with the ``_total`` suffix) unless it is
    one of ``gauges`` (sizes, things in use). Names get the ``conn25d_``
    prefix, and characters Prometheus does not allow become ``_``.
    """

    def __init__(self, values: dict[str, int], gauges: Collection[str]) -> None:
        self._values = values
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        seen: set[str] = set()
        for key, value in sorted(self._values.items()):
            gauge = key in self._gauges
            name = metric_name(key)
            if not gauge:
                name = name.removesuffix("_total")  # the library adds it back
            if name in seen:
                log.warning("localapi: metric %r clashes with another as %s; left out", key, name)
                continue
            seen.add(name)
            family = GaugeMetricFamily if gauge else CounterMetricFamily
            yield family(name, key, value=value)


def metric_name(key: str) -> str:
    """``key`` as a Prometheus name (without a counter's ``_total``)."""
    name = _NOT_NAME.sub("_", key)
    return name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name


def render_metrics(values: dict[str, int], gauges: Collection[str] = ()) -> bytes:
    """``values`` in the Prometheus text exposition format (see :class:`_Snapshot`)."""
    import prometheus_client

    return prometheus_client.generate_latest(_Snapshot(values, frozenset(gauges)))


class LocalAPI:
    """Routes of the local API; serve ``handle`` with :func:`conn25.daemon.http.serve_unix`
    or :meth:`run`.

    ``gauges`` names the keys of ``metrics()`` that are not counters.
    """

    def __init__(
        self,
        status_document: Callable[[], dict[str, Any]],
        metrics: Callable[[], dict[str, int]],
        *,
        socket_path: str | os.PathLike[str] | None = None,
        gauges: Collection[str] = (),
    ) -> None:
        self._status_document = status_document
        self._metrics = metrics
        self._socket_path = socket_path
        self._gauges = frozenset(gauges)

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

        text = render_metrics(self._metrics(), self._gauges)
        return Response(200, text, CONTENT_TYPE_LATEST)
