"""The registration sender and connector choice: BEHAVIOURS 36, 37, 39, 40 (and 28's wait).

Everything runs on trio's MockClock (autojump), so backoff and health
timing cost no real time; the connectors' peer API is a fake transport that
records requests and answers per host.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from conn25.core import config, peerapi
from conn25.core.assignments import Assignment, Assignments
from conn25.core.config import App, Member, NodeConfig, Tailnet
from conn25.core.connector import ConnectorTable
from conn25.core.peerapi import (
    HEALTH_PATH,
    RESOLVE_PATH,
    TRANSIT_IP_PATH,
    Code,
    ConnectorTransitIPRequest,
    ConnectorTransitIPResponse,
    HealthResponse,
    ResolveAnswer,
    ResolveQuery,
    ResolveResponse,
    TransitIPResponse,
)
from conn25.daemon.dataplane import Dataplane, Ids
from conn25.daemon.registration import RESOLVES_IN_FLIGHT, Registrar, ResolveError
from conn25.fastpath import Datapath
from nodekeys import public_key


def ip(text: str):
    return ipaddress.ip_address(text)


T0 = 1_700_000_000.0
PORT = 41642
TAG = "tag:github-app-connector"
GITHUB = App("GitHub", ("github.com.", "*.github.com."), (TAG,))
LAPTOP = Member("laptop", (ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")), ("192.0.2.1", 41641),
                public_key("laptop"), user="alice@example.com")
C1 = Member("gh-connector-1", (ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")), ("192.0.2.2", 41641),
            public_key("gh-connector-1"), tags=(TAG,))
C2 = Member("gh-connector-2", (ip("100.64.0.3"),), ("192.0.2.3", 41641),
            public_key("gh-connector-2"), tags=(TAG,))
H1, H2 = "100.64.0.2", "100.64.0.3"  # where the registrar reaches them
# C2 comes first in the file: the choice must still be by name.
TAILNET = Tailnet(nodes=(LAPTOP, C2, C1), tag_owners={TAG: ("alice@example.com",)})


def client_config(apps: tuple[App, ...] = (GITHUB,), node: Member = LAPTOP,
                  advertise: bool = False) -> NodeConfig:
    return NodeConfig(tailnet=TAILNET, node=node, advertise_connector=advertise, apps=apps,
                      pools=config.DEFAULT_POOLS,
                      app_users=frozenset(n.name for n in TAILNET.nodes))


class FakeNode:
    """A RegistrarNode made of real core objects (assignments, datapath tables)."""

    def __init__(self, cfg: NodeConfig | None = None) -> None:
        self.config = cfg or client_config()
        self.assignments = Assignments(self.config.pools)
        self.connector: ConnectorTable | None = None
        self.datapath = Datapath(client=True)
        self.dataplane = Dataplane(self.datapath.tables, Ids())
        self.peerapi_port = PORT
        self.registrar: Registrar
        self.t = T0
        self.changed = 0

    def now(self) -> float:
        return self.t

    def peer_id(self, name: str) -> int:
        return self.dataplane.ids.peer(name)

    def install_connector_mappings(self, mappings) -> None:
        pass

    def assignments_changed(self) -> None:
        self.changed += 1

    def metrics(self) -> dict[str, int]:
        return {"reloads": 0, **{f"registration_{k}": v
                                 for k, v in self.registrar.counters().items()}}

    def reserve(self, domain: str, real: str, flows: int = 0, app: str = "GitHub") -> Assignment:
        a, _ = self.assignments.reserve(app, domain, ip(real), 300, self.t)
        a.active_flows = flows
        return a


class FakePeers:
    """The peer API of the connectors, by host: records every request.

    ``down`` hosts fail in transport; ``code`` decides each item's result;
    ``status`` overrides the HTTP status of transit-IP answers; ``failures``
    counts down transport failures of transit-IP posts per host.
    """

    def __init__(self) -> None:
        self.posts: list[tuple[float, str, ConnectorTransitIPRequest]] = []
        self.dns: list[tuple[str, ResolveQuery]] = []
        self.exchanges: list[tuple[str, int]] = []  # resolve requests: (host, queries)
        self.gets: list[str] = []
        self.down: set[str] = set()
        self.failures: dict[str, int] = {}
        self.status: dict[str, list[int]] = {}
        self.code: Callable[[str, peerapi.TransitIPRequest], int] = lambda host, item: Code.OK
        self.health: dict[str, HealthResponse] = {
            H1: HealthResponse(True, ["GitHub"], C1.name),
            H2: HealthResponse(True, ["GitHub"], C2.name),
        }
        self.gate: trio.Event | None = None  # transit-IP posts wait for it when set

    async def post(self, host: str, port: int, method: str, target: str, body: bytes = b"", *,
                   timeout: float, content_type: str = "application/json") -> tuple[int, bytes]:
        assert (port, method) == (PORT, "POST") and timeout > 0
        await trio.sleep(0)
        if target == RESOLVE_PATH:
            queries = peerapi.decode_resolve_request(body).queries
            self.dns.extend((host, q) for q in queries)
            self.exchanges.append((host, len(queries)))
            if self.gate is not None:
                await self.gate.wait()
            if host in self.down:
                raise OSError(f"connect to {host}: no route")
            return 200, peerapi.encode(ResolveResponse(
                [ResolveAnswer(answer=b"answer from " + host.encode() + b" to " + q.query)
                 for q in queries]))
        assert target == TRANSIT_IP_PATH
        req = peerapi.decode_transit_request(body)
        self.posts.append((trio.current_time(), host, req))
        if self.gate is not None:
            await self.gate.wait()
        if host in self.down or self.failures.get(host, 0) > 0:
            self.failures[host] = self.failures.get(host, 0) - 1
            raise OSError(f"connect to {host}: refused")
        if self.status.get(host):
            return self.status[host].pop(0), b"connector is busy\n"
        codes = [self.code(host, item) for item in req.transit_ips]
        resp = ConnectorTransitIPResponse([TransitIPResponse(c, f"code {c}" if c else "")
                                           for c in codes])
        return 200, peerapi.encode(resp)

    async def get(self, host: str, port: int, method: str, target: str, body: bytes = b"", *,
                  timeout: float, content_type: str = "application/json") -> tuple[int, bytes]:
        assert (port, method, target) == (PORT, "GET", HEALTH_PATH)
        self.gets.append(host)
        await trio.sleep(0)
        if host in self.down:
            await trio.sleep(timeout + 1)  # a dead peer: no answer at all
        return 200, peerapi.encode(self.health[host])

    def posted(self, host: str | None = None) -> list[list[str]]:
        """Transit IPs of each transit-IP request (to ``host``)."""
        return [[i.transit_ip for i in req.transit_ips]
                for _, h, req in self.posts if host is None or h == host]


def setup(**kwargs) -> tuple[FakeNode, FakePeers, Registrar]:
    node, peers = FakeNode(kwargs.pop("cfg", None)), FakePeers()
    node.registrar = Registrar(node, post=peers.post, get=peers.get, **kwargs)
    return node, peers, node.registrar


def run(fn: Callable[[], Awaitable[None]]) -> None:
    """Run ``fn`` on a MockClock; a test that never finishes fails after an hour of mock time."""

    async def bounded():
        with trio.fail_after(3600):
            await fn()

    trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


def run_with_registrar(reg: Registrar, fn: Callable[[], Awaitable[None]]) -> None:
    """:func:`run` ``fn`` with ``reg`` running (started first, cancelled when ``fn`` returns)."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reg.run)
            await fn()
            nursery.cancel_scope.cancel()

    run(main)


def register_with_running(reg: Registrar, items: list[Assignment]) -> bool:
    """Start the registrar, register ``items``, stop it; what register() returned."""
    result: list[bool] = []

    async def main() -> None:
        result.append(await reg.register(items))

    run_with_registrar(reg, main)
    return result[0]


def installed_with(node: FakeNode, a: Assignment, conn: Member) -> bool:
    """The datapath sends a's magic IP to ``conn``, and the assignment says so."""
    tables = node.datapath.tables
    return (
        tables.lookup_magic(a.magic) == ("hit", a.transit.packed)
        and tables.lookup_route(a.transit) == node.peer_id(conn.name)
        and a.connector == conn.name
    )


# -- registering ------------------------------------------------------------------


def test_assignments_are_sent_as_transit_destination_app_domain_and_installed_on_ack():
    """{transitIP, destinationIP, app} (+ domain) to the connector; then the route."""
    node, peers, reg = setup()
    a = node.reserve("api.github.com.", "203.0.113.7")

    assert register_with_running(reg, [a])
    [(_, host, req)] = peers.posts
    assert host == H1
    assert msgspec_builtins(req) == {"transitIPs": [{
        "transitIP": str(a.transit), "destinationIP": "203.0.113.7", "app": "GitHub",
        "domain": "api.github.com."}]}
    assert installed_with(node, a, C1)
    assert node.changed >= 1  # the attach is persisted
    assert reg.counters()["acked"] == 1


def msgspec_builtins(req: ConnectorTransitIPRequest) -> dict:
    import msgspec

    return msgspec.json.decode(peerapi.encode(req))


def test_items_queued_while_a_request_is_out_go_together_in_one_request():
    """Every pending item for one connector in one request."""
    node, peers, reg = setup()
    first = node.reserve("github.com.", "203.0.113.1")
    later = [node.reserve("github.com.", f"203.0.113.{i}") for i in (2, 3, 4)]
    results: list[bool] = []

    async def register(items):
        results.append(await reg.register(items))

    async def main():
        peers.gate = trio.Event()
        # Both connectors known healthy before anything is queued: with only C2's answer in,
        # the first request would go to C2 and the later ones to C1, as two requests.
        await reg.check_health()
        async with trio.open_nursery() as nursery:
            await nursery.start(reg.run)
            nursery.start_soon(register, [first])
            with trio.fail_after(5):
                while not peers.posts:  # wait until the first request is out (and held)
                    await trio.sleep(0.01)
            nursery.start_soon(register, later[:2])
            nursery.start_soon(register, later[2:])
            with trio.fail_after(5):
                while reg.counters()["queued"] < 4:
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()  # the sender has seen them
            assert len(peers.posts) == 1
            peers.gate.set()
            with trio.fail_after(5):
                while len(results) < 3:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    run(main)
    sent = peers.posted()
    assert len(sent) == 2 and sent[0] == [str(first.transit)]
    assert sorted(sent[1]) == sorted(str(a.transit) for a in later)
    assert results == [True, True, True]
    assert all(installed_with(node, a, C1) for a in [first, *later])


def test_one_call_with_several_assignments_is_one_request():
    """All pending assignments for one connector go in one request; failures retry with backoff;
    the chosen connector is health-checked and a failed one is replaced by the next, with
    mappings moved."""
    node, peers, reg = setup()
    items = [node.reserve("github.com.", "203.0.113.1"), node.reserve("github.com.", "2001:db8::1"),
             node.reserve("gist.github.com.", "203.0.113.2")]

    assert register_with_running(reg, items + items[:1])  # a repeat is sent once
    assert peers.posted() == [[str(a.transit) for a in items]]
    assert all(installed_with(node, a, C1) for a in items)


@pytest.mark.parametrize("code", [Code.DUPLICATE_TRANSIT_IP, Code.NO_PEER_FAMILY,
                                  Code.FAMILY_MISMATCH, Code.UNKNOWN_APP,
                                  Code.MISSING_PERMISSION])
def test_permanent_error_codes_fail_without_retry(code):
    """Codes 2-6: False, nothing installed, and never sent again."""
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    peers.code = lambda host, item: code

    async def main():
        assert await reg.register([a]) is False
        await trio.sleep(60)

    run_with_registrar(reg, main)
    assert len(peers.posts) == 1
    assert node.datapath.tables.lookup_route(a.transit) is None
    assert node.datapath.tables.lookup_magic(a.magic) == ("not_ours", None)
    assert a.connector is None
    assert reg.counters()["refused"] == 1


def test_only_the_refused_item_of_a_batch_fails():
    node, peers, reg = setup()
    good = node.reserve("github.com.", "203.0.113.1")
    bad = node.reserve("github.com.", "2001:db8::1")
    peers.code = lambda host, item: Code.NO_PEER_FAMILY if item.transit == bad.transit else Code.OK
    outcome: dict[str, bool] = {}

    async def register(name, a):
        outcome[name] = await reg.register([a])

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(register, "good", good)
            nursery.start_soon(register, "bad", bad)
            await trio.sleep(1)  # both queued before the sender starts
            await nursery.start(reg.run)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    run(main)
    assert len(peers.posts) == 1
    assert outcome == {"good": True, "bad": False}
    assert installed_with(node, good, C1) and bad.connector is None


def test_code_1_is_retried_once_then_fails():
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    peers.code = lambda host, item: Code.OTHER

    async def main():
        assert await reg.register([a]) is False
        await trio.sleep(60)

    run_with_registrar(reg, main)
    assert len(peers.posts) == 2
    assert reg.counters()["retried_other"] == 1 and reg.counters()["refused"] == 1


def test_code_1_then_ok_succeeds():
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    answers = iter([Code.OTHER, Code.OK])
    peers.code = lambda host, item: next(answers)

    assert register_with_running(reg, [a])
    assert len(peers.posts) == 2 and installed_with(node, a, C1)


def test_transport_failures_retry_with_exponential_backoff_then_succeed():
    """Failures retry with backoff."""
    node, peers, reg = setup(backoff_initial=0.25)
    a = node.reserve("github.com.", "203.0.113.1")
    peers.failures[H1] = 3

    assert register_with_running(reg, [a])
    times = [t for t, _, _ in peers.posts]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [0.25, 0.5, 1.0]
    assert installed_with(node, a, C1)
    assert reg.counters()["request_failures"] == 3 and reg.counters()["retries"] == 3


def test_non_200_answers_are_retried():
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    peers.status[H1] = [503, 500]

    assert register_with_running(reg, [a])
    assert len(peers.posts) == 3 and installed_with(node, a, C1)


def test_a_malformed_or_short_answer_is_a_failed_send():
    node, peers, reg = setup(max_attempts=2)
    a = node.reserve("github.com.", "203.0.113.1")
    bodies = iter([b"{not json", peerapi.encode(ConnectorTransitIPResponse([]))])

    async def post(*args, **kwargs):
        peers.posts.append((trio.current_time(), args[0], ConnectorTransitIPRequest()))
        return 200, next(bodies)

    reg._post = post

    assert register_with_running(reg, [a]) is False
    assert len(peers.posts) == 2 and a.connector is None
    assert reg.counters()["request_failures"] == 2 and reg.counters()["gave_up"] == 1


def test_retries_are_bounded():
    node, peers, reg = setup(max_attempts=3)
    a = node.reserve("github.com.", "203.0.113.1")
    peers.failures[H1] = peers.failures[H2] = 100  # both answer health, neither takes posts

    async def main():
        assert await reg.register([a]) is False
        await trio.sleep(120)

    run_with_registrar(reg, main)
    assert len(peers.posts) == 3
    assert reg.counters()["gave_up"] == 1 and reg.counters()["queue_full"] == 0


def test_a_caller_that_stops_waiting_still_gets_the_mapping_registered():
    """The DNS side gives up after its timeout; the sender keeps trying."""
    node, peers, reg = setup(backoff_initial=1.0)
    a = node.reserve("github.com.", "203.0.113.1")
    peers.failures[H1] = 2

    async def main():
        with trio.move_on_after(0.5) as waited:
            await reg.register([a])
        assert waited.cancelled_caught
        assert a.connector is None
        await trio.sleep(10)

    run_with_registrar(reg, main)
    assert installed_with(node, a, C1)


def test_a_full_queue_refuses_at_once_and_counts():
    node, peers, reg = setup(queue_size=2)
    items = [node.reserve("github.com.", f"203.0.113.{i}") for i in (1, 2, 3)]

    async def main():
        with trio.fail_after(0.001):  # no waiting at all
            assert await reg.register(items) is False

    run(main)
    assert peers.posts == [] and reg.core.pending == 0
    assert reg.counters()["queue_full"] == 1


def test_an_app_without_connector_candidates_fails_at_once():
    lonely = App("Lonely", ("lonely.example.",), ("tag:nobody",))
    node, peers, reg = setup(cfg=client_config(apps=(GITHUB, lonely)))
    a = node.reserve("lonely.example.", "203.0.113.1", app="Lonely")

    async def main():
        with trio.fail_after(1):
            assert await reg.register([a]) is False

    run_with_registrar(reg, main)
    assert peers.posts == []


def test_an_assignment_reclaimed_before_its_ack_is_not_installed():
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")

    async def main():
        peers.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(reg.run)
            result: list[bool] = []

            async def register():
                result.append(await reg.register([a]))

            nursery.start_soon(register)
            await trio.sleep(1)
            node.t += 10_000
            assert node.assignments.reclaim(node.t) == [a]
            peers.gate.set()
            await trio.sleep(1)
            assert result == [False]
            nursery.cancel_scope.cancel()

    run(main)
    assert node.datapath.tables.lookup_route(a.transit) is None


def test_bad_settings_are_refused():
    node = FakeNode()
    for kwargs in ({"queue_size": 0}, {"max_attempts": 0}, {"health_interval": 0},
                   {"backoff_initial": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            Registrar(node, **kwargs)


# -- rejects ----------------------------------------------------------------------


def test_several_rejects_cause_exactly_one_reregistration():
    """Once, de-duplicated while pending and rate limited after."""
    node, peers, reg = setup(reject_interval=1.0)
    a = node.reserve("github.com.", "203.0.113.1")

    async def main():
        assert await reg.register([a])
        for _ in range(5):
            reg.rejected(a.transit)  # pending: de-duplicated
        await trio.sleep(0.1)
        for _ in range(5):
            reg.rejected(a.transit)  # acked within the interval: rate limited
        await trio.sleep(0.1)
        assert len(peers.posts) == 2
        await trio.sleep(1)
        reg.rejected(a.transit)  # a second later: allowed again
        await trio.sleep(0.1)

    run_with_registrar(reg, main)
    assert peers.posted() == [[str(a.transit)]] * 3
    c = reg.counters()
    assert (c["rejects"], c["reregistrations"], c["rejects_deduplicated"],
            c["rejects_rate_limited"]) == (11, 2, 4, 5)
    assert installed_with(node, a, C1)


def test_a_reject_for_an_unknown_transit_ip_is_ignored():
    _, peers, reg = setup()

    async def main():
        reg.rejected(ip("169.254.200.1"))
        await trio.sleep(1)

    run_with_registrar(reg, main)
    assert peers.posts == [] and reg.counters()["rejects_unknown"] == 1


def test_a_reject_resends_to_the_connector_healthy_now():
    """Whichever connector is healthy now, not the one it was registered with."""
    node, peers, reg = setup(unhealthy_after=1)
    a = node.reserve("github.com.", "203.0.113.1")

    async def main():
        assert await reg.register([a])
        peers.health[H1] = HealthResponse(True, ["Other"], C1.name)  # dropped the app
        await reg.check_health()
        await trio.sleep(1)
        reg.rejected(a.transit)
        await trio.sleep(1)

    run_with_registrar(reg, main)
    assert peers.posted(H2)[-1] == [str(a.transit)]
    assert installed_with(node, a, C2)


# -- connector choice and failover ----------------------------------------------


def test_the_first_healthy_candidate_by_name_is_chosen():
    """Stable order by name (C2 is listed first in the file)."""
    _, peers, reg = setup()

    async def main():
        # Before any health answer: the first candidate, without waiting for a round.
        assert reg.connector_for(GITHUB) == C1
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C1
        peers.health[H1] = HealthResponse(False, ["GitHub"], C1.name)  # not advertising
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C2
        peers.health[H1] = HealthResponse(True, ["GitLab"], C1.name)  # not for this app
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C2
        peers.health[H1] = HealthResponse(True, ["GitHub"], C1.name)
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C1
        peers.down |= {H1, H2}
        for _ in range(2):
            await reg.check_health()
        assert reg.connector_for(GITHUB) is None

    run(main)
    assert reg.health_of(C1.name, GITHUB) is False


def test_a_connector_that_never_answered_is_skipped_at_once():
    _, peers, reg = setup()
    peers.down.add(H1)

    async def main():
        await reg.check_health()

    run(main)
    assert reg.connector_for(GITHUB) == C2
    assert reg.health()[C1.name]["reachable"] is False


def test_one_missed_health_check_does_not_fail_over():
    _, peers, reg = setup(unhealthy_after=2)

    async def main():
        await reg.check_health()
        peers.down.add(H1)
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C1
        await reg.check_health()
        assert reg.connector_for(GITHUB) == C2

    run(main)
    assert reg.counters()["failovers"] == 1


def test_health_failover_moves_mappings_to_the_next_connector_in_one_request():
    """The failed connector's mappings are re-registered with the next; routes follow."""
    node, peers, reg = setup(health_interval=2.0, unhealthy_after=2)
    items = [node.reserve("github.com.", f"203.0.113.{i}") for i in (1, 2, 3)]

    async def main():
        assert await reg.register(items)
        assert all(installed_with(node, a, C1) for a in items)
        peers.down.add(H1)
        await trio.sleep(15)

    run_with_registrar(reg, main)
    assert peers.posted(H2) == [[str(a.transit) for a in items]]
    assert all(installed_with(node, a, C2) for a in items)
    assert reg.connector_for(GITHUB) == C2
    c = reg.counters()
    assert (c["failovers"], c["moved"]) == (1, 3)


def test_mappings_stay_when_the_first_connector_comes_back():
    """Only a failure moves mappings: a recovered first connector gets new ones only."""
    node, peers, reg = setup(unhealthy_after=1)
    old = node.reserve("github.com.", "203.0.113.1")

    async def main():
        peers.down.add(H1)
        await reg.check_health()
        assert await reg.register([old])
        peers.down.clear()
        await reg.check_health()
        new = node.reserve("github.com.", "203.0.113.2")
        assert await reg.register([new])
        assert installed_with(node, new, C1)

    run_with_registrar(reg, main)
    assert installed_with(node, old, C2)


def test_restored_mappings_of_a_dead_connector_move_after_the_first_health_round():
    node, peers, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    node.assignments.attach(a.transit, C1.name)  # as restored from the state dir
    peers.down.add(H1)

    async def main():
        await trio.sleep(5)

    run_with_registrar(reg, main)
    assert installed_with(node, a, C2)


# -- resolving at a connector -----------------------------------------------------------------


def answer(resolved: tuple[str, ResolveAnswer]) -> tuple[str, bytes]:
    return resolved[0], resolved[1].answer


def test_resolve_posts_the_wire_query_and_the_offers_to_the_chosen_connector():
    _, peers, reg = setup()
    offers = [ip("169.254.128.1"), ip("169.254.128.2")]

    async def main():
        assert answer(await reg.resolve(GITHUB, b"\x12\x34query", offers)) \
            == (C1.name, b"answer from " + H1.encode() + b" to \x12\x34query")

    run(main)
    assert peers.dns == [(H1, ResolveQuery("GitHub", b"\x12\x34query",
                                           ["169.254.128.1", "169.254.128.2"]))]


def test_queries_waiting_at_once_share_a_few_exchanges_and_each_gets_its_own_answer():
    _, peers, reg = setup()
    peers.gate = trio.Event()
    got = {}

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(300):
                async def one(i=i):
                    got[i] = answer(await reg.resolve(GITHUB, b"q%d" % i))
                nursery.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            peers.gate.set()

    run(main)
    assert got == {i: (C1.name, b"answer from " + H1.encode() + b" to q%d" % i)
                   for i in range(300)}
    # The first exchanges leave at once, one query each; the rest wait and share.
    sizes = [n for _, n in peers.exchanges]
    assert sum(sizes) == 300 and max(sizes) == peerapi.MAX_QUERIES
    assert len(sizes) <= RESOLVES_IN_FLIGHT + -(-300 // peerapi.MAX_QUERIES), sizes


def test_resolve_fails_over_to_the_next_candidate_on_transport_errors():
    _, peers, reg = setup()
    peers.down.add(H1)

    async def main():
        assert answer(await reg.resolve(GITHUB, b"q")) == (C2.name, b"answer from "
                                                           + H2.encode() + b" to q")
        peers.down.add(H2)
        with pytest.raises(ResolveError, match=r"no connector answered.*gh-connector-1.*OSError"):
            await reg.resolve(GITHUB, b"q")

    run(main)
    assert [h for h, _ in peers.dns] == [H1, H2, H1, H2]
    c = reg.counters()
    assert (c["resolves"], c["resolve_failovers"], c["resolve_failures"]) == (2, 2, 1)


@pytest.mark.parametrize("bad", [
    (503, b"busy\n"), (200, b"{not json"), (200, b'{"answers": 7}'), (200, b'{"answers": []}'),
    (200, peerapi.encode(ResolveResponse([ResolveAnswer(404, "app not served here")]))),
])
def test_resolve_moves_on_from_an_error_status_or_an_unreadable_answer(bad):
    _, _, reg = setup()

    async def first_bad(host, port, method, target, body=b"", *, timeout, content_type=""):
        if host == H1:
            return bad
        return 200, peerapi.encode(ResolveResponse([ResolveAnswer(answer=b"from H2")]))

    reg._post = first_bad

    async def main():
        assert answer(await reg.resolve(GITHUB, b"q")) == (C2.name, b"from H2")

    run(main)
    assert reg.counters()["resolve_failovers"] == 1


def test_resolve_times_out_a_connector_that_does_not_answer():
    _, _, reg = setup(resolve_timeout=2.0)

    async def slow_then_fast(host, port, method, target, body=b"", *, timeout, content_type=""):
        if host == H1:
            await trio.sleep(3600)
        return 200, peerapi.encode(ResolveResponse([ResolveAnswer(answer=b"from H2")]))

    reg._post = slow_then_fast

    async def main():
        start = trio.current_time()
        assert answer(await reg.resolve(GITHUB, b"q")) == (C2.name, b"from H2")
        assert trio.current_time() - start == pytest.approx(2.0)

    run(main)


def test_resolve_without_candidates_says_so():
    lonely = App("Lonely", ("lonely.example.",), ("tag:nobody",))
    _, _, reg = setup(cfg=client_config(apps=(lonely,)))

    async def main():
        with pytest.raises(ResolveError, match="no connector candidates"):
            await reg.resolve(lonely, b"q")

    run(main)


def test_an_assignment_mapped_while_resolving_is_installed_with_that_connector():
    node, _, reg = setup()
    a = node.reserve("github.com.", "203.0.113.1")
    reg.mapped_in_resolution(a, C2.name)
    assert installed_with(node, a, C2) and node.changed == 1
    assert reg.counters()["mapped_in_resolution"] == 1
    with pytest.raises(ValueError, match="no node 'gone'"):
        reg.mapped_in_resolution(a, "gone")


def test_health_is_checked_every_interval_and_at_once_after_a_failure():
    """Candidates are health-checked periodically; a failed request asks for a check now."""
    _, peers, reg = setup(health_interval=2.0)

    async def main():
        await trio.sleep(9)  # rounds at 0, 2, 4, 6, 8
        assert peers.gets.count(H1) == peers.gets.count(H2) == 5
        peers.down.add(H1)
        await reg.resolve(GITHUB, b"q")  # C1 fails: check without waiting for the round
        await trio.sleep(0.5)
        assert peers.gets.count(H1) == 6

    run_with_registrar(reg, main)


def test_resolve_skips_a_connector_known_to_be_down_unless_all_are():
    _, peers, reg = setup(unhealthy_after=1)

    async def main():
        peers.health[H1] = HealthResponse(False, [], C1.name)
        await reg.check_health()
        await reg.resolve(GITHUB, b"q")
        assert [h for h, *_ in peers.dns] == [H2]
        peers.down.add(H2)
        await reg.check_health()
        # Both known down: the knowledge may be stale, so both are tried, in order.
        assert answer(await reg.resolve(GITHUB, b"q")) == (C1.name, b"answer from "
                                                           + H1.encode() + b" to q")

    run(main)
    assert [h for h, *_ in peers.dns] == [H2, H1]


def test_a_move_that_failed_is_tried_again_at_the_next_health_round():
    """Mappings do not stay on a failed connector because one move was refused."""
    node, peers, reg = setup(unhealthy_after=1, health_interval=2.0)
    a = node.reserve("github.com.", "203.0.113.1")
    refusals = iter([Code.MISSING_PERMISSION])
    peers.code = lambda host, item: next(refusals, Code.OK) if host == H2 else Code.OK

    async def main():
        assert await reg.register([a])
        peers.down.add(H1)
        await trio.sleep(3.5)  # the round at 2 s moves it; C2 refuses
        assert peers.posted(H2) == [[str(a.transit)]] and installed_with(node, a, C1)
        await trio.sleep(3)  # the next round tries again

    run_with_registrar(reg, main)
    assert peers.posted(H2) == [[str(a.transit)]] * 2
    assert installed_with(node, a, C2)
