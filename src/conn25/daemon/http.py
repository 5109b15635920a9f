"""HTTP/1.1 over trio streams, with h11 doing all the parsing and framing.

The server (:func:`serve_tcp`, :func:`serve_unix`) runs one task per
connection and hands each complete request to an async handler. It is built
to face peers it does not trust:

* a request body over ``max_body`` is refused with 413 as soon as that is
  known (from Content-Length, or from the running count of a chunked body),
  without reading the rest first;
* a connection that sends nothing gets ``idle_timeout``; once a request has
  started its head must arrive within ``header_timeout`` and all of it within
  ``request_timeout`` (a client that drips bytes cannot hold a connection: 408);
* headers over ``max_header`` bytes get 431, other protocol errors 400;
* at most ``max_connections`` connections are served at once, any more get
  an immediate 503;
* with ``Limits.per_source``, each source address has a budget of its own:
  connections over its ``max_connections`` get an immediate 503, requests
  over its rate 429, so one source at its maximum leaves the others served;
* ``accept_source`` may refuse a source outright: its connections are closed
  without a byte of answer;
* refusals that a peer can cause at will are counted and logged as
  summaries (:class:`conn25.daemon.refusals.RefusalLog`), never a line each;
* a handler that raises gives 500 (and a logged traceback), one that takes
  longer than ``handler_timeout`` gives 503; the server keeps serving.

The client (:func:`request`, :func:`request_unix`) sends one request per
connection and raises :class:`HTTPError` for anything that is not a
well-formed response; :class:`ClientPool` does the same on kept-alive
connections.
"""

from __future__ import annotations

import contextlib
import errno
import http
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from ..core.peerapi import MAX_BODY
from ..core.throttle import SourceAccounting, SourceLimits
from .refusals import RefusalLog

__all__ = [
    "ClientPool",
    "HTTPError",
    "Handler",
    "Limits",
    "Request",
    "Response",
    "request",
    "request_unix",
    "serve_tcp",
    "serve_unix",
]

log = logging.getLogger("conn25.daemon.http")

TEXT = "text/plain; charset=utf-8"
_RECV_SIZE = 65536
# After we answered and decided to close, the client may still be sending
# (a refused body): reading it for a moment lets the answer arrive instead of
# being destroyed by the RST that closing a socket with unread data causes.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 4 * MAX_BODY
# Client side: what a response body may reach before we give up on it.
MAX_RESPONSE = 4 * MAX_BODY


class HTTPError(Exception):
    """The other side did not speak HTTP/1.1 properly (or broke the connection)."""


@dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: list[tuple[bytes, bytes]]  # names lower-cased (h11 does that)
    body: bytes
    peer: tuple[str, int] | None  # remote (address, port); None on a unix socket

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def header(self, name: str) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        key = name.lower().encode("ascii")
        return next((v for k, v in self.headers if k == key), None)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(
        cls, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        """A one-line plain-text answer (errors)."""
        return cls(status, f"{message}\n".encode(), TEXT, headers or [])


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    """What the server allows one peer (seconds, bytes, connections)."""

    idle_timeout: float = 30.0  # waiting for the first byte of a request
    request_timeout: float = 10.0  # first byte to the end of the body; also for sending
    handler_timeout: float = 30.0
    max_connections: int = 256
    max_header: int = 16 * 1024
    header_timeout: float = 10.0  # first byte to the end of the head (capped by request_timeout)
    per_source: SourceLimits | None = None  # budgets per source address (TCP only)

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "request_timeout", "handler_timeout", "header_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive (got {getattr(self, name)})")
        if self.max_connections < 1 or self.max_header < 1:
            raise ValueError(
                f"Limits.max_connections and max_header must be at least 1 "
                f"(got {self.max_connections}, {self.max_header})"
            )


# -- server -------------------------------------------------------------------


async def serve_tcp(
    host: str,
    port: int,
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    limits: Limits = Limits(),  # frozen: one shared default is safe
    accept_source: Callable[[str], bool] | None = None,
    refusals: RefusalLog | None = None,
    name: str = "http",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; ``started`` gives the bound port.

    ``accept_source(address)`` False: the connection is closed unanswered.
    Refusals go to ``refusals`` under reasons that start with ``name``.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    guard = _Guard(limits, accept_source, refusals, name)
    try:
        await _serve(listeners, handler, max_body, limits, bound, task_status, guard)
    finally:
        for listener in listeners:
            listener.socket.close()  # not aclose(): we may be cancelled


async def serve_unix(
    path: str | os.PathLike[str],
    handler: Handler,
    *,
    max_body: int = MAX_BODY,
    limits: Limits = Limits(),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on a unix socket at ``path`` until cancelled.

    A socket file left by a process that died is removed first; a path that
    is in use, or is not a socket, is an error (OSError) and left alone. The
    socket file is removed on exit unless another server has replaced it.
    """
    path = os.fspath(path)
    await _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        inode = os.stat(path).st_ino
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    try:
        await _serve([listener], handler, max_body, limits, path, task_status,
                     _Guard(limits, None, None, "http"))
    finally:
        # Synchronous: an await here would raise at once when we are being cancelled.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        sock.close()


async def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not removing it")
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1.0):
            await probe.connect(path)
        raise OSError(errno.EADDRINUSE, f"another process is serving on {path}")
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a leftover of a process that died
    finally:
        probe.close()


class _Guard:
    """The server's refusals: who may connect, per-source budgets, counted summaries."""

    def __init__(self, limits: Limits, accept_source: Callable[[str], bool] | None,
                 refusals: RefusalLog | None, name: str) -> None:
        self.limits = limits
        self.accept_source = accept_source
        self.refusals = refusals if refusals is not None else RefusalLog(log)
        self.name = name
        self.sources = SourceAccounting(limits.per_source) if limits.per_source else None

    def refuse(self, peer: tuple[str, int] | None, reason: str, detail: str) -> None:
        source = peer[0] if peer is not None else "unix socket peer"
        self.refusals.refuse(source, f"{self.name}_{reason}", detail)


async def _serve(
    listeners: list[trio.SocketListener],
    handler: Handler,
    max_body: int,
    limits: Limits,
    started: object,
    task_status: trio.TaskStatus[Any],
    guard: _Guard,
) -> None:
    active = 0
    busy = _standalone(Response.text(503, "too many connections", [("Connection", "close")]))
    sources = guard.sources

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal active
        peer = _peer_of(stream)
        source = peer[0] if peer is not None else None

        async def send_busy() -> None:
            with trio.move_on_after(limits.request_timeout):
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await stream.send_all(busy)
        if source is not None and guard.accept_source is not None \
                and not guard.accept_source(source):
            # Not one of those this server is for: no answer tells it what runs here.
            guard.refuse(peer, "not_peer", "connection from an address this server does not "
                                           "serve, closed unanswered")
            await trio.aclose_forcefully(stream)
            return
        if sources is not None and source is not None and not sources.open(source):
            guard.refuse(peer, "connections_per_source",
                         f"over {sources.limits.max_connections} connections from one source")
            # No linger: a source at its limit must not hold more of our time per attempt.
            await send_busy()
            await trio.aclose_forcefully(stream)
            return
        try:
            if active >= limits.max_connections:
                guard.refuse(peer, "busy", f"{active} connections open")
                await send_busy()
                await _close(stream, linger_bytes=limits.max_header)
                return
            active += 1
            try:
                await _Connection(stream, handler, peer, max_body, limits, guard).serve()
            except Exception:
                # A bug here must cost one connection, not the server.
                log.error("http: %s: connection failed", _where(peer), exc_info=True)
                await trio.aclose_forcefully(stream)
            finally:
                active -= 1
        finally:
            if sources is not None and source is not None:
                sources.close(source)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started(started)


def _peer_of(stream: trio.SocketStream) -> tuple[str, int] | None:
    if stream.socket.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    name = stream.socket.getpeername()
    return (name[0], name[1])


def _where(peer: tuple[str, int] | None) -> str:
    return "unix socket peer" if peer is None else _authority(*peer)


def _standalone(resp: Response) -> bytes:
    """``resp`` rendered by h11 without a request (h11 lets a server refuse one it never read)."""
    conn = h11.Connection(h11.SERVER)
    return b"".join(conn.send(e) or b"" for e in _response_events(resp, head=False))


def _response_events(resp: Response, *, head: bool) -> list[h11.Event]:
    headers = [
        ("Content-Type", resp.content_type),
        ("Content-Length", str(len(resp.body))),
        *resp.headers,
    ]
    try:
        reason = http.HTTPStatus(resp.status).phrase.encode()
    except ValueError:
        reason = b""
    events: list[h11.Event] = [
        h11.Response(status_code=resp.status, headers=headers, reason=reason)
    ]
    if resp.body and not head:  # h11 frames a HEAD answer as empty
        events.append(h11.Data(data=resp.body))
    events.append(h11.EndOfMessage())
    return events


async def _close(stream: trio.SocketStream, *, linger_bytes: int) -> None:
    """Close after a last answer, reading what the peer still sends for a moment (see above)."""
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.send_eof()
                got = 0
                while got < linger_bytes:
                    data = await stream.receive_some(_RECV_SIZE)
                    if not data:
                        break
                    got += len(data)
    finally:
        await trio.aclose_forcefully(stream)  # closes before its checkpoint, even when cancelled


@dataclass(eq=False, repr=False)
class _Connection:
    """One server connection: read a request, answer it, repeat while keep-alive holds."""

    stream: trio.SocketStream
    handler: Handler
    peer: tuple[str, int] | None
    max_body: int
    limits: Limits
    guard: _Guard

    def __post_init__(self) -> None:
        # Not a declared field: a class-level name h11 would shadow the module in annotations.
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header)

    async def serve(self) -> None:
        answered = False
        try:
            while True:
                got = await self._read_request()
                if got is None:
                    return
                if isinstance(got, Response):  # the request was refused while reading it
                    answered = True
                    await self._send(got, head=False)
                    return
                resp = self._over_rate()
                if resp is None:
                    resp = await self._call(got)
                answered = True
                if not await self._send(resp, head=got.method == "HEAD"):
                    return
                if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                    return  # h11 says the connection must close (HTTP/1.0, Connection: close)
                self.h11.start_next_cycle()
                answered = False
        finally:
            if answered:
                await _close(self.stream, linger_bytes=self.max_body + self.limits.max_header)
            else:
                await trio.aclose_forcefully(self.stream)

    def _over_rate(self) -> Response | None:
        """A 429 when this request is over its source's rate, else None."""
        sources = self.guard.sources
        if sources is None or self.peer is None:
            return None
        if sources.request(self.peer[0], trio.current_time()):
            return None
        rate = sources.limits.rate
        self.guard.refuse(self.peer, "rate_limited", f"over {rate:g} requests per second")
        return Response.text(429, f"over {rate:g} requests per second from one source",
                             [("Retry-After", "1")])

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_RECV_SIZE)
        except trio.BrokenResourceError:
            return b""  # a reset: h11 sees the end of the stream

    async def _read_request(self) -> Request | Response | None:
        """The next complete request; a Response to refuse it with; None when the peer left."""
        conn, limits = self.h11, self.limits
        # A pipelined request may already be buffered: its clock is running.
        started = bool(conn.trailing_data[0])
        head_limit = min(limits.header_timeout, limits.request_timeout)
        since = trio.current_time()
        timeout = head_limit if started else limits.idle_timeout
        head: h11.Request | None = None
        body = bytearray()
        with trio.CancelScope(relative_deadline=timeout) as scope:
            # The deadline due now, given to the scope only before a wait: a request that
            # arrives in one piece (most do) costs no change of the scope's deadline.
            due = scope.deadline
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        if scope.deadline != due:
                            scope.deadline = due
                        data = await self._receive()
                        if data and not started:
                            # From the first byte on, the request runs on one clock: the
                            # head within header_timeout, all of it within request_timeout.
                            started = True
                            since = trio.current_time()
                            due = since + head_limit
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        head = event
                        due = since + limits.request_timeout
                        if conn.they_are_waiting_for_100_continue:
                            scope.deadline = due  # _check_head sends 100 Continue
                        refusal = await self._check_head(event)
                        if refusal is not None:
                            return refusal
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > self.max_body:
                            return self._refuse(413, f"request body over {self.max_body} bytes")
                    elif isinstance(event, h11.EndOfMessage):
                        assert head is not None
                        return Request(
                            method=head.method.decode("ascii"),
                            target=head.target.decode("latin-1"),
                            headers=list(head.headers),
                            body=bytes(body),
                            peer=self.peer,
                        )
                    else:  # ConnectionClosed (PAUSED cannot happen before a response)
                        return None
            except h11.RemoteProtocolError as e:
                if not started:
                    return None  # closed or reset between requests: nothing to answer
                return self._refuse(e.error_status_hint, f"malformed request: {e}")
        if not started:
            return None  # idle keep-alive connection: close quietly
        if head is None:
            return self._refuse(408, f"request head not complete within {head_limit:g} s")
        return self._refuse(408, f"request not complete within {limits.request_timeout:g} s")

    async def _check_head(self, event: h11.Request) -> Response | None:
        # h11 bounds a head that arrives in pieces; one that came in a single
        # read is measured here.
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.limits.max_header:
            return self._refuse(431, f"request head over {self.limits.max_header} bytes")
        for name, value in event.headers:
            if name == b"content-length" and int(value) > self.max_body:
                return self._refuse(
                    413, f"request body of {int(value)} bytes is over {self.max_body}"
                )
        if self.h11.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await self._send_bytes(self.h11.send(go_on) or b"")
        return None

    def _refuse(self, status: int, reason: str) -> Response:
        self.guard.refuse(self.peer, "bad_requests", f"{status} {reason}")
        return Response.text(status, reason, [("Connection", "close")])

    async def _call(self, req: Request) -> Response:
        def what() -> str:  # for the errors only: every request would pay for it
            return f"{_where(self.peer)} {req.method} {req.path}"

        with trio.CancelScope(relative_deadline=self.limits.handler_timeout):
            try:
                resp = await self.handler(req)
            except Exception:
                log.error("http: %s: handler failed", what(), exc_info=True)
                return Response.text(500, "internal error")
            if not isinstance(resp, Response):
                log.error("http: %s: handler returned %r, not a Response", what(), resp)
                return Response.text(500, "internal error")
            return resp
        log.error("http: %s: handler took over %s s", what(), self.limits.handler_timeout)
        return Response.text(503, "request took too long")

    async def _send(self, resp: Response, *, head: bool) -> bool:
        """Send ``resp``; False when the connection is no longer usable."""
        try:
            events = _response_events(resp, head=head)
        except h11.LocalProtocolError as e:  # e.g. a header value with a newline
            log.error("http: %s: handler's response is not valid HTTP: %s", _where(self.peer), e)
            events = _response_events(Response.text(500, "internal error"), head=head)
        data = b"".join(self.h11.send(e) or b"" for e in events)
        return await self._send_bytes(data)

    async def _send_bytes(self, data: bytes) -> bool:
        with trio.CancelScope(relative_deadline=self.limits.request_timeout):
            try:
                await self.stream.send_all(data)
                return True
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
        log.info("http: %s: peer did not read the response in time", _where(self.peer))
        return False


# -- client -------------------------------------------------------------------


async def request(host: str, port: int, method: str, target: str, body: bytes = b"", *,
                  timeout: float, content_type: str = "application/json",
                  max_response: int = MAX_RESPONSE, local_address: str | None = None,
                  ) -> tuple[int, bytes]:
    """One request over a new TCP connection (from ``local_address`` when given); (status, body).

    Raises HTTPError for a malformed or incomplete response, OSError when
    the connection cannot be made, trio.TooSlowError after ``timeout``
    seconds for the whole exchange.
    """
    authority = _authority(host, port)
    return await _over(lambda: trio.open_tcp_stream(host, port, local_address=local_address),
                       authority,
                       f"http://{authority}{target}", method, target, body, timeout,
                       content_type, max_response)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def request_unix(
    path: str | os.PathLike[str],
    method: str,
    target: str,
    body: bytes = b"",
    *,
    timeout: float,
    content_type: str = "application/json",
    max_response: int = MAX_RESPONSE,
) -> tuple[int, bytes]:
    """As :func:`request`, over the unix socket at ``path``."""
    path = os.fspath(path)
    return await _over(lambda: trio.open_unix_socket(path), "localhost", f"unix:{path} {target}",
                       method, target, body, timeout, content_type, max_response)


async def _over(
    connect: Callable[[], Awaitable[trio.SocketStream]], authority: str, where: str,
    method: str, target: str, body: bytes, timeout: float, content_type: str, max_response: int,
) -> tuple[int, bytes]:
    """One exchange on a new connection made by ``connect``, all within ``timeout``."""
    with trio.fail_after(timeout):
        stream = await connect()
        async with stream:
            return await _exchange(stream, h11.Connection(h11.CLIENT), authority, method, target,
                                   body, content_type, max_response, where, close=True)


class _Unanswered(HTTPError):
    """The connection ended before a single byte of a response came back."""


async def _exchange(
    stream: trio.SocketStream,
    conn: h11.Connection,
    authority: str,
    method: str,
    target: str,
    body: bytes,
    content_type: str,
    max_response: int,
    where: str,
    *,
    close: bool,
) -> tuple[int, bytes]:
    headers = [
        ("Host", authority),
        *([("Connection", "close")] if close else []),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
    ]
    try:
        out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError as e:
        raise HTTPError(f"{method} {where}: cannot send this request: {e}") from None
    status: int | None = None
    chunks: list[bytes] = []
    size = 0
    eof = False
    answered = False  # any byte of a response seen
    closed = f"{method} {where}: connection closed before a complete response"
    try:
        await stream.send_all(out)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_RECV_SIZE)
                eof = not data
                answered = answered or not eof
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_response:
                    raise HTTPError(f"{method} {where}: response body over {max_response} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert status is not None
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise (HTTPError if answered else _Unanswered)(closed)
            # InformationalResponse (100 Continue): keep reading
    except h11.RemoteProtocolError as e:
        if eof:
            raise (HTTPError if answered else _Unanswered)(closed) from None
        raise HTTPError(f"{method} {where}: malformed response: {e}") from None
    except trio.BrokenResourceError as e:
        error = HTTPError if answered else _Unanswered
        raise error(f"{method} {where}: connection broken: {e.__cause__ or e}") from None


class ClientPool:
    """HTTP/1.1 keep-alive connections by (host, port), for idempotent requests.

    :meth:`request` is :func:`request` on a reused connection when one is
    idle: a new connection per request costs a handshake and a teardown on
    both ends, which is most of a small exchange's time. A connection goes
    back to the pool after a complete response that leaves it open; at most
    ``max_idle`` wait per server, for at most ``idle_seconds`` (below the
    server's idle timeout). A server may still close an idle connection
    just as it is reused; a request that gets no byte of a response back on
    a reused connection is therefore sent once more on a new one, which is
    why only idempotent requests belong here.

    At most ``max_per_host`` requests are out to one server at once; more
    wait their turn (within their timeout) instead of opening connections
    the server's per-source limit would refuse: a burst of requests then
    shares a few connections.
    """

    def __init__(self, *, max_idle: int = 8, idle_seconds: float = 10.0,
                 max_per_host: int = 8) -> None:
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.max_per_host = max_per_host
        self._turns: dict[tuple[str, int], trio.Semaphore] = {}
        # Per server, most recently used last: (stream, h11 state, idle since).
        self._idle: dict[tuple[str, int], list[tuple[trio.SocketStream, h11.Connection, float]]] \
            = {}
        self.counters = {"connections": 0, "reused": 0, "retried": 0}

    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def request(self, host: str, port: int, method: str, target: str, body: bytes = b"",
                      *, timeout: float, content_type: str = "application/json",
                      max_response: int = MAX_RESPONSE) -> tuple[int, bytes]:
        """As :func:`request`, on a pooled connection."""
        authority = _authority(host, port)
        where = f"http://{authority}{target}"
        args = (authority, method, target, body, content_type, max_response, where)
        key = (host, port)
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = trio.Semaphore(self.max_per_host)
        with trio.fail_after(timeout):
            try:
                # A free turn without a checkpoint: waiting on the Semaphore would cost a
                # pass of the scheduler before the request leaves, which a fresh name's
                # DNS answer waits for (the exchange's socket calls checkpoint anyway).
                turn.acquire_nowait()
            except trio.WouldBlock:
                await turn.acquire()
            try:
                return await self._request(key, args)
            finally:
                turn.release()

    async def _request(self, key: tuple[str, int],
                       args: tuple[str, str, str, bytes, str, int, str]) -> tuple[int, bytes]:
        reused = self._take(key)
        if reused is not None:
            self.counters["reused"] += 1
            try:
                stream, conn = reused
                return await self._exchange(key, stream, conn, *args)
            except _Unanswered as e:
                self.counters["retried"] += 1
                log.debug("http: %s on a kept-alive connection: %s; once more on a new one",
                          args[-1], e)
        stream = await trio.open_tcp_stream(*key)
        self.counters["connections"] += 1
        return await self._exchange(key, stream, h11.Connection(h11.CLIENT), *args)

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for stream, _, _ in idle:
                stream.socket.close()
        self._idle.clear()

    async def _exchange(
        self, key: tuple[str, int], stream: trio.SocketStream, conn: h11.Connection,
        authority: str, method: str, target: str, body: bytes, content_type: str,
        max_response: int, where: str,
    ) -> tuple[int, bytes]:
        keep = False
        try:
            result = await _exchange(stream, conn, authority, method, target, body, content_type,
                                     max_response, where, close=False)
            keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE
            return result
        finally:
            if keep:
                conn.start_next_cycle()
                self._put(key, stream, conn)
            else:
                stream.socket.close()

    def _take(self, key: tuple[str, int]) -> tuple[trio.SocketStream, h11.Connection] | None:
        idle = self._idle.get(key)
        now = trio.current_time()
        while idle:
            stream, conn, since = idle.pop()
            if now - since < self.idle_seconds:
                return stream, conn
            stream.socket.close()
        return None

    def _put(self, key: tuple[str, int], stream: trio.SocketStream, conn: h11.Connection) -> None:
        idle = self._idle.setdefault(key, [])
        now = trio.current_time()
        # Drop those that waited too long (oldest first) and keep room for this one.
        while idle and (len(idle) >= self.max_idle or now - idle[0][2] >= self.idle_seconds):
            idle.pop(0)[0].socket.close()
        idle.append((stream, conn, now))

