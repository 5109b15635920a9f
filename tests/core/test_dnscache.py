"""The client's answer cache (sans-IO): which queries are keyed, how TTLs count
down, what is never stored, and the bound on its size."""

import struct

import pytest
from dnslib import CNAME, EDNS0, QTYPE, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from conn25.core.dnscache import AnswerCache, ForwardCache, ttl_offsets
from conn25.core.dnsquery import parse, question_key

T0 = 1_700_000_000.0


def query(name="app.test", qtype="A", qid=0x1234, rd=1, edns=False):
    q = DNSRecord(DNSHeader(id=qid, rd=rd), q=DNSQuestion(name, getattr(QTYPE, qtype)))
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    return q.pack()


def answer(name="app.test", ttls=(300,), qid=0, rd=1):
    r = DNSRecord(DNSHeader(id=qid, qr=1, rd=rd, ra=1), q=DNSQuestion(name, QTYPE.A))
    for i, ttl in enumerate(ttls):
        r.add_answer(RR(name, QTYPE.A, rdata=A(f"100.80.0.{i}"), ttl=ttl))
    return r.pack()


def ttls_of(wire):
    return [rr.ttl for rr in DNSRecord.parse(wire).rr]


def test_a_plain_query_is_keyed_by_its_question_bytes():
    q = query()
    assert question_key(q) == q[12:]
    assert question_key(query(qid=7, rd=0)) == q[12:]  # id and flags are not the question


def test_an_edns_query_has_the_key_of_the_same_question_without_edns():
    assert question_key(query(edns=True)) == question_key(query())


def test_name_case_and_type_make_different_keys():
    keys = {question_key(query("app.test")), question_key(query("App.Test")),
            question_key(query("app.test", "AAAA"))}
    assert len(keys) == 3 and None not in keys


@pytest.mark.parametrize("wire", [
    b"",
    query()[:16],                                        # question cut short
    bytes([0x12, 0x34, 0x81, 0x80]) + query()[4:],       # a response (QR set)
    bytes([0x12, 0x34, 0x28, 0x00]) + query()[4:],       # opcode UPDATE
    query()[:4] + b"\x00\x02" + query()[6:],             # two questions claimed
    query()[:6] + b"\x00\x01" + query()[8:],             # an answer section in a query
    query()[:12] + b"\xc0\x0c\x00\x01\x00\x01",          # a compressed name
    query()[:12] + b"\x05ab",                            # label runs past the end
])
def test_what_is_not_a_plain_query_has_no_key(wire):
    assert question_key(wire) is None


@given(st.binary(max_size=64))
def test_question_key_never_raises(wire):
    key = question_key(wire)
    assert key is None or wire[12:].startswith(key)


def test_ttl_offsets_find_every_record_through_compression():
    r = DNSRecord(DNSHeader(qr=1), q=DNSQuestion("www.app.test", QTYPE.A))
    r.add_answer(RR("www.app.test", QTYPE.CNAME, rdata=CNAME("app.test"), ttl=11))
    r.add_answer(RR("app.test", QTYPE.A, rdata=A("192.0.2.1"), ttl=22))
    r.add_auth(RR("test", QTYPE.SOA, rdata=SOA("ns.test", "h.test", (1, 2, 3, 4, 5)), ttl=33))
    wire = r.pack()
    offsets = ttl_offsets(wire)
    assert [struct.unpack_from("!I", wire, o)[0] for o in offsets] == [11, 22, 33]


def test_ttl_offsets_of_a_truncated_message_is_an_error():
    with pytest.raises(ValueError):
        ttl_offsets(answer()[:-3])


def test_a_hit_carries_the_query_id_and_rd_bit_and_the_assignments():
    cache = AnswerCache()
    q = query(qid=0xBEEF, rd=0)
    assert cache.put(parse(q), answer(qid=0, rd=1), ["a1"], T0)
    out, assignments = cache.get(parse(q), T0)
    rec = DNSRecord.parse(out)
    assert rec.header.id == 0xBEEF and rec.header.rd == 0 and rec.header.qr == 1
    assert assignments == ["a1"] and ttls_of(out) == [300]


def test_ttls_count_down_in_whole_seconds_and_the_entry_ends_with_the_smallest():
    cache = AnswerCache()
    q = query()
    key = parse(q)
    cache.put(key, answer(ttls=(300, 120)), [], T0)
    assert ttls_of(cache.get(key, T0 + 10.7)[0]) == [290, 110]
    assert ttls_of(cache.get(key, T0 + 119.9)[0]) == [181, 1]
    assert cache.get(key, T0 + 120) is None
    assert len(cache) == 0  # dropped, not kept around expired


def test_a_clock_that_went_back_misses():
    cache = AnswerCache()
    q = query()
    cache.put(parse(q), answer(), [], T0)
    assert cache.get(parse(q), T0 - 1) is None


@pytest.mark.parametrize("wire", [answer(ttls=()), answer(ttls=(0,)), answer()[:-2]],
                         ids=["no records", "ttl 0", "malformed"])
def test_negative_zero_ttl_and_malformed_answers_are_not_stored(wire):
    cache = AnswerCache()
    assert not cache.put(parse(query()), wire, [], T0)
    assert len(cache) == 0


def test_the_oldest_entry_makes_room_when_full():
    cache = AnswerCache(entries=2)
    qs = [query(f"n{i}.app.test") for i in range(3)]
    for q in qs:
        cache.put(parse(q), answer(), [], T0)
    assert len(cache) == 2
    assert cache.get(parse(qs[0]), T0) is None
    assert cache.get(parse(qs[2]), T0) is not None


def test_storing_a_question_again_replaces_its_answer_and_clock():
    cache = AnswerCache()
    q = query()
    key = parse(q)
    cache.put(key, answer(ttls=(100,)), [], T0)
    cache.put(key, answer(ttls=(300,)), [], T0 + 50)
    assert ttls_of(cache.get(key, T0 + 60)[0]) == [290]


def test_clear_and_drop_forget_entries():
    cache = AnswerCache()
    q1, q2 = query("a.test"), query("b.test")
    for q in (q1, q2):
        cache.put(parse(q), answer(), [], T0)
    cache.drop(parse(q1))
    assert cache.get(parse(q1), T0) is None and len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_an_empty_cache_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        AnswerCache(entries=0)


def test_a_query_without_a_key_is_neither_stored_nor_found():
    q = bytes([0x12, 0x34, 0x28, 0x00]) + query()[4:]  # opcode UPDATE: not keyed
    cache = AnswerCache()
    assert not cache.put(parse(q), answer(), [], T0)
    assert cache.get(parse(q), T0) is None and len(cache) == 0


# -- the forwarder's cache: every other name, negative answers too (RFC 2308) -----------------


def negative(name="gone.test", rcode=3, soa_ttl=900, minimum=60, qid=0, with_soa=True):
    r = DNSRecord(DNSHeader(id=qid, qr=1, rd=1, ra=1, rcode=rcode),
                  q=DNSQuestion(name, QTYPE.A))
    if with_soa:
        r.add_auth(RR("test", QTYPE.SOA, ttl=soa_ttl, rdata=SOA(
            "ns.test", "admin.test", (1, 3600, 600, 86400, minimum))))
    return r.pack()


@pytest.mark.parametrize(("soa_ttl", "minimum", "kept_for"), [(900, 60, 60), (30, 600, 30)])
@pytest.mark.parametrize("rcode", [3, 0], ids=["NXDOMAIN", "NODATA"])
def test_a_negative_answer_is_kept_for_the_soa_negative_ttl(rcode, soa_ttl, minimum, kept_for):
    cache = ForwardCache()
    q = parse(query("gone.test"))
    assert cache.put(q, negative(rcode=rcode, soa_ttl=soa_ttl, minimum=minimum), T0)
    hit = cache.get(parse(query("gone.test", qid=9)), T0 + kept_for - 1)
    assert hit is not None and DNSRecord.parse(hit).header.rcode == rcode
    assert DNSRecord.parse(hit).header.id == 9
    assert cache.get(q, T0 + kept_for) is None


def test_what_the_forwarder_cache_does_not_keep():
    cache = ForwardCache()
    q = parse(query("x.test"))
    servfail = DNSRecord(DNSHeader(qr=1, rcode=2), q=DNSQuestion("x.test")).pack()
    truncated = bytearray(answer("x.test"))
    truncated[2] |= 0x02
    for wire in (negative(with_soa=False), servfail, bytes(truncated), answer("x.test", (0,)),
                 b"\x00" * 5):
        assert not cache.put(q, wire, T0)
    assert len(cache) == 0


def test_the_forwarder_cache_is_bounded_in_entries_and_bytes():
    cache = ForwardCache(entries=3, max_bytes=10_000)
    for i in range(5):
        assert cache.put(parse(query(f"n{i}.test")), answer(f"n{i}.test"), T0)
    assert len(cache) == 3
    assert cache.get(parse(query("n0.test")), T0) is None  # the oldest went first
    assert cache.get(parse(query("n4.test")), T0) is not None
    big = [answer(f"big{i}.test", ttls=(300,) * 60) for i in range(4)]  # about 1 KiB each
    cap = len(big[0]) * 2 + 10
    small = ForwardCache(entries=100, max_bytes=cap)
    for i, wire in enumerate(big):
        assert small.put(parse(query(f"big{i}.test")), wire, T0)
        assert small.held_bytes <= cap
    assert len(small) == 2  # two fit in the bytes; the oldest went
    assert small.get(parse(query("big3.test")), T0) is not None
    assert not ForwardCache(max_bytes=len(big[0]) - 1).put(parse(query("big0.test")), big[0], T0)
