"""The h11-over-trio HTTP server and client (the transport of the peer API).

Timeouts are tested on trio's MockClock (autojump), so they cost no real time.
"""

import contextlib
import errno
import functools
import logging
import os
import socket

import h11
import pytest
import trio
import trio.testing

from conn25.core.peerapi import MAX_BODY
from conn25.core.throttle import SourceLimits
from conn25.daemon import http
from conn25.daemon.http import HTTPError, Limits, Request, Response
from conn25.daemon.refusals import RefusalLog

HOST = "127.0.0.1"


def run_mock(fn) -> None:
    """Run ``fn`` on a clock that jumps ahead whenever every task waits."""
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


class Recorder:
    """A handler that echoes the request and remembers what it saw."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, req: Request) -> Response:
        self.seen.append(req)
        if req.path == "/boom":
            raise RuntimeError("handler bug")
        if req.path == "/hang":
            await trio.sleep_forever()
        if req.path == "/bad-header":
            return Response(200, b"", headers=[("X-Bad", "a\r\nb")])
        return Response(200, req.method.encode() + b" " + req.target.encode() + b" " + req.body,
                        "text/plain", [("X-Body-Length", str(len(req.body)))])


@contextlib.asynccontextmanager
async def serving(handler, **kw):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: http.serve_tcp(
            HOST, 0, handler, task_status=task_status, **kw))
        yield port
        nursery.cancel_scope.cancel()


class Client:
    """An h11 client on one connection (for keep-alive, chunked and raw-bytes cases)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> "Client":
        return cls(await trio.open_tcp_stream(HOST, port))

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def request(self, method: str, target: str, body: bytes = b"", headers=()) -> None:
        hdrs = [("Host", "test"), ("Content-Length", str(len(body))), *headers]
        await self.send(h11.Request(method=method, target=target, headers=hdrs),
                        h11.Data(data=body), h11.EndOfMessage())

    def pretend_sent(self, method: str = "GET") -> None:
        """Prime the state machine for reading the answer to bytes we wrote ourselves."""
        self.conn.send(h11.Request(method=method, target="/", headers=[("Host", "test")]))
        self.conn.send(h11.EndOfMessage())

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        event = await self.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await self.next_event()
        assert isinstance(event, h11.Response), event
        body = b""
        while not isinstance(data := await self.next_event(), h11.EndOfMessage):
            body += data.data
        return event.status_code, dict(event.headers), body

    async def at_eof(self) -> bool:
        return await self.stream.receive_some(1) == b""


@contextlib.asynccontextmanager
async def connected(handler, **kw):
    """A server of ``handler`` (``serving``'s options) and one client connection to it."""
    async with serving(handler, **kw) as port:
        yield await Client.connect(port)


async def raw(port: int, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    client = await Client.connect(port)
    client.pretend_sent()
    await client.stream.send_all(data)
    return await client.response()


# -- routing and keep-alive ------------------------------------------------------


def test_request_reaches_the_handler_with_method_target_body_and_peer():
    rec = Recorder()

    async def main():
        async with serving(rec) as port:
            status, body = await http.request(HOST, port, "POST", "/a/b?x=1&y=", b"hello",
                                              timeout=5)
            assert (status, body) == (200, b"POST /a/b?x=1&y= hello")
            (req,) = rec.seen
            assert req.path == "/a/b" and req.query == {"x": ["1"], "y": [""]}
            assert req.peer is not None and req.peer[0] == HOST
            assert req.header("Content-Type") == b"application/json"
            assert req.header("x-missing") is None

    trio.run(main)


def test_keep_alive_serves_several_requests_on_one_connection():
    rec = Recorder()

    async def main():
        async with connected(rec) as client:
            for i in range(3):
                await client.request("POST", f"/n{i}", b"x" * i)
                status, headers, body = await client.response()
                assert (status, body) == (200, f"POST /n{i} ".encode() + b"x" * i)
                assert headers[b"x-body-length"] == str(i).encode()
                client.conn.start_next_cycle()
            assert len({r.peer for r in rec.seen}) == 1  # the same connection

    trio.run(main)


def test_pipelined_requests_are_answered_in_order():
    async def main():
        async with connected(Recorder()) as client:
            second = h11.Connection(h11.CLIENT)  # renders the pipelined request
            data = b"".join(
                c.send(e) or b""
                for c, target in ((client.conn, "/one"), (second, "/two"))
                for e in (h11.Request(method="GET", target=target, headers=[("Host", "t")]),
                          h11.EndOfMessage())
            )
            await client.stream.send_all(data)
            assert (await client.response())[2] == b"GET /one "
            client.conn.start_next_cycle()
            client.pretend_sent()
            assert (await client.response())[2] == b"GET /two "

    trio.run(main)


def test_head_gets_headers_without_body():
    async def main():
        async with connected(Recorder()) as client:
            await client.request("HEAD", "/x")
            status, headers, body = await client.response()
            assert status == 200 and body == b""
            assert headers[b"content-length"] == str(len(b"HEAD /x ")).encode()

    trio.run(main)


# -- body limit (over 1 MiB is refused) ------------------------------------


def test_body_of_exactly_the_limit_is_accepted():
    async def main():
        async with serving(Recorder()) as port:
            status, body = await http.request(HOST, port, "POST", "/", b"a" * MAX_BODY, timeout=10)
            assert status == 200 and len(body) == len("POST / ") + MAX_BODY

    trio.run(main)


def test_body_one_byte_over_the_limit_gets_413_and_the_handler_never_runs():
    """One result per item, in request order. Not configured: 503. Not POST: 405. Malformed JSON:
    400. Body over 1 MiB: refused."""
    rec = Recorder()

    async def main():
        async with serving(rec) as port:
            status, body = await http.request(HOST, port, "POST", "/", b"a" * (MAX_BODY + 1),
                                              timeout=10)
            assert status == 413 and b"over" in body
            # The server still serves.
            assert (await http.request(HOST, port, "GET", "/ok", timeout=5))[0] == 200
        assert [r.path for r in rec.seen] == ["/ok"]

    trio.run(main)


def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent():
    """413 comes from Content-Length alone: the client never sends a byte of body."""
    rec = Recorder()

    async def main():
        async with connected(rec) as client:
            await client.send(h11.Request(method="POST", target="/", headers=[
                ("Host", "t"), ("Content-Length", str(10**12))]))
            status, headers, _ = await client.response()
            assert status == 413 and headers[b"connection"] == b"close"
            assert await client.at_eof()
        assert rec.seen == []

    trio.run(main)


def test_chunked_body_over_the_limit_is_counted_and_refused():
    rec = Recorder()

    async def main():
        async with connected(rec, max_body=1000) as client:
            await client.send(h11.Request(method="POST", target="/", headers=[
                ("Host", "t"), ("Transfer-Encoding", "chunked")]))
            for _ in range(3):
                await client.send(h11.Data(data=b"z" * 400))
            assert (await client.response())[0] == 413
        assert rec.seen == []

    trio.run(main)


def test_chunked_body_under_the_limit_is_assembled():
    async def main():
        async with connected(Recorder(), max_body=1000) as client:
            await client.send(
                h11.Request(method="POST", target="/c",
                            headers=[("Host", "t"), ("Transfer-Encoding", "chunked")]),
                h11.Data(data=b"ab"), h11.Data(data=b"cd"), h11.EndOfMessage())
            status, _, body = await client.response()
            assert (status, body) == (200, b"POST /c abcd")

    trio.run(main)


def test_expect_100_continue_is_answered_before_the_body():
    async def main():
        async with connected(Recorder()) as client:
            await client.send(h11.Request(method="POST", target="/e", headers=[
                ("Host", "t"), ("Content-Length", "3"), ("Expect", "100-continue")]))
            event = await client.next_event()
            assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
            await client.send(h11.Data(data=b"abc"), h11.EndOfMessage())
            assert (await client.response())[2] == b"POST /e abc"

    trio.run(main)


# -- malformed requests ------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"this is not http\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
])
def test_malformed_request_gets_400_and_the_server_keeps_serving(data):
    rec = Recorder()

    async def main():
        async with serving(rec) as port:
            status, headers, _ = await raw(port, data)
            assert status == 400 and headers[b"connection"] == b"close"
            assert (await http.request(HOST, port, "GET", "/ok", timeout=5))[0] == 200
        assert [r.path for r in rec.seen] == ["/ok"]

    trio.run(main)


def test_oversized_headers_get_431():
    async def main():
        async with serving(Recorder(), limits=Limits(max_header=1024)) as port:
            head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 2000 + b"\r\n"
            # In one piece, and growing without an end.
            assert (await raw(port, head + b"\r\n"))[0] == 431
            assert (await raw(port, head))[0] == 431

    trio.run(main)


# -- timeouts -------------------------------------------------------------------------


def test_slow_client_is_cut_off_after_the_request_timeout():
    """A slowloris dripping one header byte a second gets 408 after request_timeout."""
    limits = Limits(idle_timeout=100, request_timeout=5)

    async def main():
        async with connected(Recorder(), limits=limits) as client:
            client.pretend_sent()
            start = trio.current_time()

            async def drip():
                with contextlib.suppress(trio.BrokenResourceError):
                    for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 1000:
                        await client.stream.send_all(bytes([b]))
                        await trio.sleep(1)  # virtual time

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drip)
                status, _, _ = await client.response()
                assert await client.at_eof()
                nursery.cancel_scope.cancel()
            assert status == 408
            assert 5 <= trio.current_time() - start < 7

    run_mock(main)


def test_idle_connection_is_closed_after_the_idle_timeout():
    async def main():
        async with connected(Recorder(), limits=Limits(idle_timeout=30)) as client:
            start = trio.current_time()
            assert await client.at_eof()  # closed without an answer
            assert 30 <= trio.current_time() - start < 31

    run_mock(main)


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout():
    async def main():
        async with connected(Recorder(), limits=Limits(idle_timeout=30)) as client:
            await client.request("GET", "/")
            assert (await client.response())[0] == 200
            start = trio.current_time()
            assert await client.at_eof()
            assert 30 <= trio.current_time() - start < 31

    run_mock(main)


def test_handler_taking_too_long_gets_503():
    async def main():
        async with serving(Recorder(), limits=Limits(handler_timeout=3)) as port:
            assert (await http.request(HOST, port, "GET", "/hang", timeout=10))[0] == 503
            assert (await http.request(HOST, port, "GET", "/ok", timeout=10))[0] == 200

    run_mock(main)


# -- handler failures ------------------------------------------------------------------


def test_handler_exception_gives_500_is_logged_and_the_server_keeps_serving(caplog):
    caplog.set_level(logging.ERROR, logger="conn25.daemon.http")

    async def main():
        async with connected(Recorder()) as client:
            await client.request("GET", "/boom")
            status, _, body = await client.response()
            assert (status, body) == (500, b"internal error\n")
            # Same connection, next request.
            client.conn.start_next_cycle()
            await client.request("GET", "/after")
            assert (await client.response())[0] == 200

    trio.run(main)
    (record,) = caplog.records
    assert "GET /boom" in record.getMessage() and record.exc_info[0] is RuntimeError


def test_invalid_response_from_the_handler_gives_500():
    async def main():
        async with serving(Recorder()) as port:
            assert (await http.request(HOST, port, "GET", "/bad-header", timeout=5))[0] == 500

    trio.run(main)


# -- connection cap ---------------------------------------------------------------------


def test_connections_over_the_cap_get_503_until_one_closes():
    async def main():
        async with serving(Recorder(), limits=Limits(max_connections=2)) as port:
            held = []
            for _ in range(2):
                client = await Client.connect(port)
                await client.request("GET", "/")
                assert (await client.response())[0] == 200
                held.append(client)
            extra = await Client.connect(port)
            extra.pretend_sent()
            status, _, body = await extra.response()
            assert (status, body) == (503, b"too many connections\n")
            await held[0].stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert (await http.request(HOST, port, "GET", "/", timeout=5))[0] == 200

    trio.run(main)


# -- per-source limits (one peer at its maximum leaves the others served) ------------

OTHER_HOST = "127.0.0.2"  # another loopback source address


async def connect_from(port: int, source: str) -> Client:
    return Client(await trio.open_tcp_stream(HOST, port, local_address=source))


def test_one_source_at_its_connection_limit_leaves_another_source_served():
    limits = Limits(per_source=SourceLimits(max_connections=4), max_connections=1024)
    refusals = RefusalLog(logging.getLogger("test.http"))

    async def main():
        async with serving(Recorder(), limits=limits, refusals=refusals, name="api") as port:
            held = []
            for _ in range(4):  # idle: they send nothing
                held.append(await Client.connect(port))
            await trio.testing.wait_all_tasks_blocked()
            extra = []
            for _ in range(50):
                c = await Client.connect(port)
                c.pretend_sent()
                assert (await c.response())[0] == 503
                extra.append(c)
            other = await connect_from(port, OTHER_HOST)
            await other.request("GET", "/health")
            assert (await other.response())[0] == 200
            assert refusals.counters["api_connections_per_source"] == 50
            # A held connection of the first source still works.
            await held[0].request("GET", "/")
            assert (await held[0].response())[0] == 200

    trio.run(main)


def test_requests_over_a_sources_rate_get_429_and_others_are_served():
    limits = Limits(per_source=SourceLimits(rate=1, burst=3))
    refusals = RefusalLog(logging.getLogger("test.http"))

    async def main():
        async with serving(Recorder(), limits=limits, refusals=refusals) as port:
            client = await Client.connect(port)
            statuses = []
            for _ in range(6):
                await client.request("GET", "/")
                status, headers, _ = await client.response()
                statuses.append(status)
                client.conn.start_next_cycle()
            assert statuses == [200, 200, 200, 429, 429, 429]
            assert headers[b"retry-after"] == b"1"
            other = await connect_from(port, OTHER_HOST)
            await other.request("GET", "/")
            assert (await other.response())[0] == 200
            assert refusals.counters["http_rate_limited"] == 3

    run_mock(main)


def test_a_refused_source_is_closed_without_an_answer():
    rec = Recorder()
    refusals = RefusalLog(logging.getLogger("test.http"))

    async def main():
        async with serving(rec, accept_source=lambda a: a == OTHER_HOST, refusals=refusals,
                           name="api") as port:
            client = await Client.connect(port)
            with contextlib.suppress(trio.BrokenResourceError):
                await client.request("GET", "/")
            with pytest.raises(trio.BrokenResourceError):
                assert await client.stream.receive_some(1) == b""
                raise trio.BrokenResourceError  # EOF: no answer either
            assert rec.seen == []
            assert refusals.counters["api_not_peer"] == 1
            ok = await connect_from(port, OTHER_HOST)
            await ok.request("GET", "/")
            assert (await ok.response())[0] == 200

    trio.run(main)


def test_a_head_that_does_not_arrive_within_the_header_timeout_gets_408():
    limits = Limits(idle_timeout=100, request_timeout=30, header_timeout=3)

    async def main():
        async with connected(Recorder(), limits=limits) as client:
            client.pretend_sent()
            start = trio.current_time()
            await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n")  # no blank line
            status, _, body = await client.response()
            assert status == 408 and b"head" in body
            assert 3 <= trio.current_time() - start < 4

    run_mock(main)


def test_many_refused_requests_make_few_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="conn25.daemon.http")

    async def main():
        async with serving(Recorder()) as port:
            for _ in range(200):  # no Host header: 400
                assert (await raw(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 400

    trio.run(main)
    assert len([r for r in caplog.records if "400" in r.getMessage()]) == 1


def test_limits_reject_nonsense():
    with pytest.raises(ValueError, match="idle_timeout"):
        Limits(idle_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=0)


# -- unix socket --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving_unix(path, handler):
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: http.serve_unix(
            path, handler, task_status=task_status))
        yield
        nursery.cancel_scope.cancel()


def test_unix_socket_serves_with_no_peer_and_removes_its_file(tmp_path):
    path = tmp_path / "api.sock"
    rec = Recorder()

    async def main():
        async with serving_unix(path, rec):
            assert path.is_socket()
            assert await http.request_unix(path, "GET", "/u", timeout=5) == (200, b"GET /u ")
        assert rec.seen[0].peer is None
        assert not path.exists()

    trio.run(main)


def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX) as s:  # bound, never listened, closed: a crash leftover
        s.bind(str(path))

    async def main():
        async with serving_unix(path, Recorder()):
            assert (await http.request_unix(path, "GET", "/", timeout=5))[0] == 200

    trio.run(main)


def test_socket_in_use_is_not_taken_over(tmp_path):
    path = tmp_path / "api.sock"

    async def main():
        async with serving_unix(path, Recorder()):
            with pytest.raises(OSError, match="another process") as e:
                await http.serve_unix(path, Recorder())
            assert e.value.errno == errno.EADDRINUSE
            assert (await http.request_unix(path, "GET", "/", timeout=5))[0] == 200

    trio.run(main)


def test_path_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "api.sock"
    path.write_text("precious")

    async def main():
        with pytest.raises(OSError, match="not a socket"):
            await http.serve_unix(path, Recorder())

    trio.run(main)
    assert path.read_text() == "precious"


# -- client errors ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(behaviour):
    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, host=HOST),
                                          behaviour, 0)
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def test_client_raises_httperror_on_a_malformed_response():
    async def garbage(stream):
        await stream.receive_some(65536)
        await stream.send_all(b"SPEAKING NONSENSE\r\n\r\n")
        await stream.aclose()

    async def main():
        async with raw_server(garbage) as port:
            with pytest.raises(HTTPError, match=rf"GET http://{HOST}:{port}/x: malformed"):
                await http.request(HOST, port, "GET", "/x", timeout=5)

    trio.run(main)


def test_client_raises_httperror_when_the_server_hangs_up():
    async def hang_up(stream):
        await stream.receive_some(65536)
        await stream.aclose()

    async def main():
        async with raw_server(hang_up) as port:
            with pytest.raises(HTTPError, match="connection closed before a complete response"):
                await http.request(HOST, port, "GET", "/", timeout=5)

    trio.run(main)


def test_client_refuses_an_oversized_response():
    async def main():
        async with serving(Recorder()) as port:
            with pytest.raises(HTTPError, match="over 10 bytes"):
                await http.request(HOST, port, "POST", "/", b"x" * 100, timeout=5,
                                   max_response=10)

    trio.run(main)


def test_client_times_out_on_a_silent_server():
    async def silent(stream):
        await trio.sleep_forever()

    async def main():
        async with raw_server(silent) as port:
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await http.request(HOST, port, "GET", "/", timeout=3)
            assert trio.current_time() - start == pytest.approx(3)

    run_mock(main)


def test_client_connection_refused_is_oserror():
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound but not listening: refused

        async def main():
            with pytest.raises(OSError):
                await http.request(HOST, port, "GET", "/", timeout=5)

        trio.run(main)


def test_client_rejects_a_target_h11_cannot_send():
    async def main():
        async with serving(Recorder()) as port:
            with pytest.raises(HTTPError, match="cannot send"):
                await http.request(HOST, port, "GET", "/a b", timeout=5)

    trio.run(main)


def test_unix_client_to_missing_socket_is_oserror(tmp_path):
    async def main():
        with pytest.raises(OSError):
            await http.request_unix(os.fspath(tmp_path / "nope.sock"), "GET", "/", timeout=5)

    trio.run(main)


def test_a_failing_connection_does_not_take_the_server_down(monkeypatch, caplog):
    """Whatever goes wrong inside one connection is logged and ends only that connection."""
    caplog.set_level(logging.ERROR, logger="conn25.daemon.http")
    real = http._Connection._read_request
    calls = []

    async def broken_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug in the connection code")
        return await real(self)

    monkeypatch.setattr(http._Connection, "_read_request", broken_once)

    async def main():
        async with serving(Recorder()) as port:
            with pytest.raises(HTTPError):
                await http.request(HOST, port, "GET", "/", timeout=5)
            assert (await http.request(HOST, port, "GET", "/", timeout=5))[0] == 200

    trio.run(main)
    assert any("connection failed" in r.getMessage() for r in caplog.records)


# -- the keep-alive client pool --------------------------------------------------------------------


def test_pool_sends_successive_requests_on_one_connection():
    rec = Recorder()

    async def main():
        pool = http.ClientPool()
        async with serving(rec) as port:
            got = [await pool.request(HOST, port, "POST", f"/{i}", b"b", timeout=5)
                   for i in range(3)]
            pool.close()
        return got, pool.counters

    got, counters = trio.run(main)
    assert got == [(200, b"POST /0 b"), (200, b"POST /1 b"), (200, b"POST /2 b")]
    assert len({req.peer for req in rec.seen}) == 1  # one client port: one connection
    assert counters == {"connections": 1, "reused": 2, "retried": 0}


def test_pool_opens_a_connection_per_concurrent_request_and_keeps_at_most_max_idle():
    rec = Recorder()
    gate = trio.Event()

    async def handler(req):
        await gate.wait()
        return await rec(req)

    async def main():
        pool = http.ClientPool(max_idle=2)
        async with serving(handler) as port:
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(functools.partial(
                        pool.request, HOST, port, "GET", f"/{i}", timeout=5))
                await trio.testing.wait_all_tasks_blocked()
                gate.set()
            idle = pool.idle()
            pool.close()
        return idle, pool.counters

    idle, counters = trio.run(main)
    assert counters["connections"] == 3 and idle == 2
    assert len({req.peer for req in rec.seen}) == 3


def test_pool_sends_at_most_max_per_host_requests_at_once_and_the_rest_wait_their_turn():
    rec = Recorder()
    inside = [0, 0]  # now, most

    async def handler(req):
        inside[0] += 1
        inside[1] = max(inside[1], inside[0])
        await trio.sleep(0.01)
        inside[0] -= 1
        return await rec(req)

    async def main():
        pool = http.ClientPool(max_per_host=2)
        got = []
        async with serving(handler) as port:
            async with trio.open_nursery() as nursery:
                for i in range(7):
                    async def one(i=i):
                        got.append(await pool.request(HOST, port, "GET", f"/{i}", timeout=5))
                    nursery.start_soon(one)
            pool.close()
        return got, pool.counters

    got, counters = trio.run(main)
    assert sorted(got) == sorted((200, f"GET /{i} ".encode()) for i in range(7))
    assert inside[1] == 2 and counters["connections"] == 2 and counters["reused"] == 5


def test_pool_sends_again_on_a_new_connection_when_the_server_closed_the_idle_one():
    rec = Recorder()
    out = {}

    async def main():
        pool = http.ClientPool(idle_seconds=60)
        async with serving(rec, limits=Limits(idle_timeout=1)) as port:
            await pool.request(HOST, port, "GET", "/first", timeout=5)
            await trio.sleep(2)  # the server closes the idle connection meanwhile
            out["second"] = await pool.request(HOST, port, "GET", "/second", timeout=5)
            pool.close()
        out.update(pool.counters)

    run_mock(main)
    assert out["second"] == (200, b"GET /second ")
    assert (out["connections"], out["reused"], out["retried"]) == (2, 1, 1)
    assert [req.path for req in rec.seen] == ["/first", "/second"]


def test_pool_does_not_reuse_a_connection_idle_longer_than_idle_seconds():
    rec = Recorder()
    out = {}

    async def main():
        pool = http.ClientPool(idle_seconds=1)
        async with serving(rec) as port:
            await pool.request(HOST, port, "GET", "/a", timeout=5)
            await trio.sleep(2)
            await pool.request(HOST, port, "GET", "/b", timeout=5)
            pool.close()
        out.update(pool.counters)

    run_mock(main)
    assert out == {"connections": 2, "reused": 0, "retried": 0}
    assert len({req.peer for req in rec.seen}) == 2


def test_pool_keeps_no_connection_the_server_closes_after_answering():
    async def main():
        pool = http.ClientPool()
        async with serving(Recorder()) as port:
            # HTTP/1.0-style: the server answers "Connection: close" to a refused request.
            got = await pool.request(HOST, port, "POST", "/", b"x" * (MAX_BODY + 1), timeout=5)
            return got[0], pool.idle()

    assert trio.run(main) == (413, 0)


def test_pool_does_not_send_again_after_part_of_a_response_came():
    """Only a reused connection that answered nothing at all is worth a second try."""
    calls = []

    async def answer_then_break(stream):
        calls.append(await stream.receive_some(65536))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        calls.append(await stream.receive_some(65536))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await stream.aclose()

    async def main():
        pool = http.ClientPool()
        async with raw_server(answer_then_break) as port:
            assert await pool.request(HOST, port, "GET", "/", timeout=5) == (200, b"ok")
            with pytest.raises(HTTPError, match="closed before a complete response"):
                await pool.request(HOST, port, "GET", "/", timeout=5)
        return pool.counters

    assert trio.run(main) == {"connections": 1, "reused": 1, "retried": 0}
    assert len(calls) == 2
