"""The registration state machine, driven directly: no trio, no sockets, time passed in.

Each test feeds events (assignments, request results, health answers, rejects)
and checks what the machine asks the shell to do. The trio shell around it is
tested in tests/daemon/test_registration.py.
"""

from __future__ import annotations

import ipaddress
import math

import pytest

from conn25.core import config, peerapi
from conn25.core.assignments import Assignment, Assignments
from conn25.core.config import App, Member, NodeConfig, Tailnet
from conn25.core.peerapi import (
    Code,
    ConnectorTransitIPResponse,
    HealthResponse,
    TransitIPResponse,
)
from conn25.core.registrar import (
    Batch,
    CheckHealth,
    Install,
    Log,
    RegistrarMachine,
    RegistrarSettings,
    Wake,
    brief,
)
from nodekeys import public_key


def ip(text: str):
    return ipaddress.ip_address(text)


T0 = 1_700_000_000.0  # assignment time
TAG = "tag:github-app-connector"
GITHUB = App("GitHub", ("github.com.", "*.github.com."), (TAG,))
LAPTOP = Member("laptop", (ip("100.64.0.1"),), ("192.0.2.1", 41641),
                public_key("laptop"), user="alice@example.com")
C1 = Member("gh-connector-1", (ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")), ("192.0.2.2", 41641),
            public_key("gh-connector-1"), tags=(TAG,))
C2 = Member("gh-connector-2", (ip("100.64.0.3"),), ("192.0.2.3", 41641),
            public_key("gh-connector-2"), tags=(TAG,))
# C2 comes first in the file: the choice is still by name.
CFG = NodeConfig(tailnet=Tailnet(nodes=(LAPTOP, C2, C1), tag_owners={TAG: ("alice@example.com",)}),
                 node=LAPTOP, advertise_connector=False, apps=(GITHUB,),
                 pools=config.DEFAULT_POOLS, app_users=frozenset({"laptop"}))
HEALTHY = peerapi.encode(HealthResponse(True, ["GitHub"], "x"))


def machine(**kwargs) -> tuple[RegistrarMachine, Assignments]:
    store = Assignments(CFG.pools)
    return RegistrarMachine(store, RegistrarSettings(**kwargs)), store


def reserve(store: Assignments, real: str) -> Assignment:
    return store.reserve("GitHub", "github.com", ip(real), 300, T0)[0]


def ok_body(batch: Batch, codes: list[int] | None = None) -> bytes:
    codes = codes if codes is not None else [Code.OK] * len(batch.items)
    return peerapi.encode(ConnectorTransitIPResponse(
        [TransitIPResponse(c, f"code {c}" if c else "") for c in codes]))


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def send(m: RegistrarMachine, now: float = 0.0) -> list[Batch]:
    m.poll(now, CFG)
    return of(m.drain(), Batch)


def test_one_request_per_connector_holds_every_due_item_and_an_ack_installs_then_wakes():
    m, store = machine()
    a, b = reserve(store, "140.82.112.3"), reserve(store, "140.82.112.4")
    waiter = m.register([a, b])
    assert waiter is not None and not waiter.done and m.pending == 2
    [batch] = send(m)
    # Before any health answer, the first candidate by name is used.
    assert batch.connector == C1 and batch.host == "100.64.0.2"
    assert [(i.transit_ip, i.destination_ip, i.app) for i in batch.request.transit_ips] == [
        (str(a.transit), "140.82.112.3", "GitHub"), (str(b.transit), "140.82.112.4", "GitHub")]
    m.answered(batch, 200, ok_body(batch), 0.1)
    actions = m.drain()
    installs = of(actions, Install)
    assert [(i.assignment, i.connector) for i in installs] == [(a, C1), (b, C1)]
    assert of(actions, Wake) == [Wake(waiter)] and waiter.ok
    # Installs come before the wake-up: a woken caller finds the mapping in place.
    assert actions.index(installs[-1]) < actions.index(Wake(waiter))
    assert m.pending == 0 and m.counters()["acked"] == 2 and m.counters()["requests"] == 1


def test_items_arriving_while_a_request_is_out_wait_for_the_next_one():
    m, store = machine()
    a, b = reserve(store, "140.82.112.3"), reserve(store, "140.82.112.4")
    m.register([a])
    [first] = send(m)
    m.register([b])
    assert send(m) == []  # one request in flight per connector
    m.answered(first, 200, ok_body(first), 0.1)
    [second] = send(m, 0.1)
    assert [i.assignment for i in second.items] == [b]


def test_batches_hold_at_most_batch_max_items():
    m, store = machine(batch_max=2)
    items = [reserve(store, f"140.82.112.{n}") for n in range(1, 6)]
    m.register(items)
    [batch] = send(m)
    assert len(batch.items) == 2


def test_a_full_queue_refuses_at_once_and_counts():
    m, store = machine(queue_size=1)
    a, b = reserve(store, "140.82.112.3"), reserve(store, "140.82.112.4")
    assert m.register([a]) is not None
    assert m.register([b]) is None
    assert m.counters()["queue_full"] == 1 and of(m.drain(), Log)


def test_failed_sends_back_off_exponentially_then_give_up():
    m, store = machine(max_attempts=3, backoff_initial=0.25, backoff_max=8.0)
    waiter = m.register([reserve(store, "140.82.112.3")])
    now = 0.0
    [batch] = send(m, now)
    m.failed(batch, "OSError: refused", now)
    assert CheckHealth() in m.drain()
    assert m.poll(now, CFG) == pytest.approx(0.25)  # not due yet: says when
    assert of(m.drain(), Batch) == []
    [batch] = send(m, 0.25)
    m.answered(batch, 503, b"busy\n", 0.25)  # a non-200 answer is a failed send too
    assert m.poll(0.25, CFG) == pytest.approx(0.75)
    m.drain()
    [batch] = send(m, 0.75)
    m.answered(batch, 200, b"{not json", 0.75)
    assert waiter is not None and waiter.done and not waiter.ok
    assert m.counters()["gave_up"] == 1 and m.counters()["request_failures"] == 3


def test_a_short_answer_is_a_failed_send():
    m, store = machine()
    m.register([reserve(store, "140.82.112.3"), reserve(store, "140.82.112.4")])
    [batch] = send(m)
    m.answered(batch, 200, ok_body(batch, [Code.OK]), 0.0)
    assert of(m.drain(), Install) == [] and m.counters()["retries"] == 2


def test_code_1_is_retried_once_and_other_codes_fail_the_item_only():
    m, store = machine()
    a, b, c = (reserve(store, f"140.82.112.{n}") for n in (3, 4, 5))
    waiter = m.register([a, b, c])
    [batch] = send(m)
    m.answered(batch, 200, ok_body(batch, [Code.OTHER, Code.UNKNOWN_APP, Code.OK]), 0.0)
    assert [i.assignment for i in of(m.drain(), Install)] == [c]
    assert m.counters()["refused"] == 1 and m.counters()["retried_other"] == 1
    [batch] = send(m, 1.0)
    assert [i.assignment for i in batch.items] == [a]
    m.answered(batch, 200, ok_body(batch, [Code.OTHER]), 1.0)  # a second code 1 is final
    assert waiter is not None and waiter.done and not waiter.ok


def test_an_assignment_reclaimed_before_its_ack_is_not_installed():
    m, store = machine()
    a = reserve(store, "140.82.112.3")
    waiter = m.register([a])
    [batch] = send(m)
    assert store.reclaim(T0 + 10_000) == [a]
    m.answered(batch, 200, ok_body(batch), 0.0)
    assert of(m.drain(), Install) == [] and waiter is not None and not waiter.ok


def test_rejects_reregister_once_deduplicated_and_rate_limited():
    m, store = machine(reject_interval=1.0)
    a = reserve(store, "140.82.112.3")
    m.rejected(a.transit, 0.0)
    m.rejected(a.transit, 0.0)  # pending: de-duplicated
    [batch] = send(m)
    m.answered(batch, 200, ok_body(batch), 0.0)
    m.rejected(a.transit, 0.5)  # within reject_interval of the last re-send
    m.rejected(ip("100.80.0.99"), 0.5)  # not ours
    c = m.counters()
    assert (c["reregistrations"], c["rejects_deduplicated"], c["rejects_rate_limited"],
            c["rejects_unknown"], c["rejects"]) == (1, 1, 1, 1, 4)
    m.rejected(a.transit, 1.5)
    assert m.counters()["reregistrations"] == 2 and m.pending == 1


def test_the_first_healthy_candidate_by_name_is_chosen_and_a_dead_one_is_skipped():
    m, _ = machine()
    assert [n.name for n in m.health_targets(CFG)] == [C1.name, C2.name]
    m.health_failed(C1.name, "TooSlowError")  # never answered: skipped at once
    m.health_answer(C2.name, 200, HEALTHY)
    assert m.chosen_connector(GITHUB, CFG) == C2
    assert m.health_of(C1.name, GITHUB) is False and m.health()[C1.name]["error"] == "TooSlowError"
    assert m.resolve_order(GITHUB, CFG) == [C2]


def test_a_connector_that_does_not_list_the_app_is_not_healthy_for_it():
    m, _ = machine()
    m.health_answer(C1.name, 200, peerapi.encode(HealthResponse(True, ["Other"], "x")))
    assert m.health_of(C1.name, GITHUB) is False
    m.health_answer(C2.name, 404, b"not found")
    assert m.health()[C2.name]["error"] == "HTTP 404: not found"


def test_one_missed_check_is_forgiven_two_fail_over_and_move_mappings():
    m, store = machine(unhealthy_after=2)
    for n in (C1, C2):
        m.health_answer(n.name, 200, HEALTHY)
    a = reserve(store, "140.82.112.3")
    m.register([a])
    [batch] = send(m)
    m.answered(batch, 200, ok_body(batch), 0.0)
    store.attach(a.transit, C1.name)  # what the shell does on Install
    m.health_failed(C1.name, "OSError")
    assert m.health_of(C1.name, GITHUB) is True and m.counters()["failovers"] == 0
    m.health_failed(C1.name, "OSError")
    assert m.health_of(C1.name, GITHUB) is False and m.counters()["failovers"] == 1
    m.drain()
    m.move_mappings(CFG)
    assert m.counters()["moved"] == 1
    [batch] = send(m)
    assert batch.connector == C2 and [i.assignment for i in batch.items] == [a]


def test_without_a_healthy_connector_items_are_retried_and_health_is_asked_for():
    m, store = machine()
    for n in (C1, C2):
        m.health_failed(n.name, "OSError")
    m.register([reserve(store, "140.82.112.3")])
    next_at = m.poll(0.0, CFG)
    actions = m.drain()
    assert of(actions, Batch) == [] and CheckHealth() in actions
    assert next_at == pytest.approx(0.25) and m.counters()["retries"] == 1


def test_an_app_without_candidates_fails_at_once():
    m, store = machine()
    lonely = App("Lonely", ("lonely.example.",), ("tag:nobody",))
    cfg = NodeConfig(tailnet=CFG.tailnet, node=LAPTOP, advertise_connector=False,
                     apps=(GITHUB, lonely), pools=config.DEFAULT_POOLS,
                     app_users=frozenset({"laptop"}))
    a = store.reserve("Lonely", "lonely.example", ip("192.0.2.80"), 300, T0)[0]
    waiter = m.register([a])
    assert m.poll(0.0, cfg) == math.inf
    assert waiter is not None and waiter.done and not waiter.ok
    assert m.counters()["gave_up"] == 1


def test_close_lets_every_waiter_go():
    m, store = machine()
    waiter = m.register([reserve(store, "140.82.112.3")])
    m.close()
    assert Wake(waiter) in m.drain() and waiter is not None and not waiter.ok


def test_an_empty_registration_is_done_at_once():
    m, _ = machine()
    waiter = m.register([])
    assert waiter is not None and waiter.done and waiter.ok


def test_brief_is_the_first_line():
    assert brief(b"busy\nsecond line") == "busy" and brief(b"") == "(empty body)"


@pytest.mark.parametrize("bad", [{"queue_size": 0}, {"max_attempts": 0}, {"health_interval": 0},
                                 {"backoff_initial": -1}])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RegistrarSettings(**bad)
