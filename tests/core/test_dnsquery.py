"""A DNS message's head read once (sans-IO): what parse() makes of a query, which
messages answer it, and the SERVFAIL built from it."""

from __future__ import annotations

import struct

import pytest
from dnslib import CLASS, EDNS0, QTYPE, RCODE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from conn25.core.dnsquery import (
    DNSMapError,
    Query,
    answers,
    fit_udp,
    parse,
    screen,
    servfail_to,
    with_id,
    with_rcode,
)


def query(name: str = "www.App.test", qtype: str = "A", qid: int = 0x1234, rd: int = 1) -> bytes:
    return DNSRecord(DNSHeader(id=qid, rd=rd), q=DNSQuestion(name, getattr(QTYPE, qtype))).pack()


def response(name: str = "www.app.test", qid: int = 0x1234, tc: int = 0) -> bytes:
    r = DNSRecord(DNSHeader(id=qid, qr=1, tc=tc, rd=1, ra=1), q=DNSQuestion(name, QTYPE.A))
    r.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    return r.pack()


def test_a_query_is_read_into_id_flags_question_and_key():
    wire = query()
    q = parse(wire)
    assert (q.id, q.qr, q.opcode, q.complete, q.wire) == (0x1234, False, 0, True, wire)
    assert q.question is not None
    assert (q.question.labels, q.question.qtype, q.question.qclass) == (
        (b"www", b"App", b"test"), QTYPE.A, CLASS.IN)  # the asker's case is kept
    assert q.key == wire[12:]


def test_any_byte_may_be_in_a_label():
    wire = query("x.app.test").replace(b"\x01x", b"\x01\xff")
    q = parse(wire)
    assert q.complete and q.questions[0].labels == (b"\xff", b"app", b"test")


def test_a_question_cut_short_leaves_the_query_incomplete_and_unkeyed():
    q = parse(query()[:-2])
    assert not q.complete and q.questions == () and q.key is None


def test_a_message_shorter_than_a_header_is_an_error():
    with pytest.raises(DNSMapError):
        parse(b"\x00" * 11)


def test_an_answer_matches_by_id_opcode_and_question_in_any_case():
    q = parse(query("www.App.test"))
    r = answers(q, response("WWW.app.TEST"))
    assert r is not None and r.qr and not r.tc and r.rcode == RCODE.NOERROR
    assert answers(q, response(qid=0x4321)) is None  # another id: stale or spoofed
    assert answers(q, response("other.test")) is None  # another question
    assert answers(q, query("www.app.test")) is None  # not a response
    assert answers(q, b"\x12\x34") is None  # not a message at all
    assert answers(q, response(tc=1)).tc


def test_servfail_echoes_id_question_and_rd():
    wire = query(rd=1)
    out = DNSRecord.parse(servfail_to(parse(wire)))
    assert out.header.id == 0x1234 and out.header.rcode == RCODE.SERVFAIL
    assert out.header.qr == 1 and out.header.rd == 1
    assert [str(x.qname) for x in out.questions] == ["www.App.test."]


def test_servfail_of_an_incomplete_query_has_no_question():
    out = DNSRecord.parse(servfail_to(parse(query()[:-2])))
    assert out.header.rcode == RCODE.SERVFAIL and out.questions == []


def test_header_edits():
    wire = response()
    assert DNSRecord.parse(with_rcode(wire, RCODE.NXDOMAIN)).header.rcode == RCODE.NXDOMAIN
    assert with_id(wire, query(qid=7))[:2] == b"\x00\x07"


@given(st.binary(max_size=80))
def test_parse_never_raises_other_than_dnsmaperror(wire):
    try:
        q = parse(wire)
    except DNSMapError:
        assert len(wire) < 12
        return
    assert isinstance(q, Query)
    assert q.key is None or wire[12:].startswith(q.key)


@pytest.mark.parametrize(("data", "verdict"), [
    (b"\x00" * 11, "garbage"),
    (response(), "response"),
    (bytes([0x12, 0x34, 0x28, 0x00]) + query()[4:], "notimp"),  # opcode UPDATE
    (query()[:4] + b"\x00\x02" + query()[6:], "formerr"),  # two questions claimed
    (query(), "query"),
])
def test_screen_says_what_a_server_does_with_what_arrives(data, verdict):
    got, out = screen(data)
    assert got == verdict
    if verdict in ("garbage", "response"):
        assert out is None
    elif verdict == "query":
        assert isinstance(out, Query) and out.id == 0x1234 and out.wire == data
    else:
        rcode = RCODE.NOTIMP if verdict == "notimp" else RCODE.FORMERR
        assert DNSRecord.parse(out).header.rcode == rcode and out[:2] == data[:2]


def test_screen_refuses_a_question_name_longer_than_a_name_may_be():
    """Under an app's domain or not, it is no one's name: never forwarded upstream."""
    def asking(first: int) -> bytes:
        name = b"".join(bytes([n]) + b"a" * n for n in (63, 63, 63, first))
        return (struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name
                + b"\x06github\x03com\x00\x00\x01\x00\x01")

    verdict, out = screen(asking(51))  # 256 octets
    assert verdict == "formerr" and out[3] & 0xF == RCODE.FORMERR
    assert screen(asking(50))[0] == "query"  # 255 octets: a name


def test_fit_udp_truncates_past_512_bytes_or_the_edns_size():
    big = DNSRecord.parse(response())
    for i in range(40):
        big.add_answer(RR("www.app.test", QTYPE.A, rdata=A(f"198.51.100.{i}"), ttl=60))
    reply = big.pack()
    plain = parse(query())
    assert fit_udp(plain, response()) is None
    cut = DNSRecord.parse(fit_udp(plain, reply))
    assert cut.header.tc == 1 and cut.rr == [] and cut.header.id == 0x1234
    assert [str(q.qname) for q in cut.questions] == ["www.App.test."]
    edns = DNSRecord.parse(query())
    edns.add_ar(EDNS0(udp_len=4096))
    assert fit_udp(parse(edns.pack()), reply) is None
    small = DNSRecord.parse(query())
    small.add_ar(EDNS0(udp_len=600))
    cut = DNSRecord.parse(fit_udp(parse(small.pack()), reply))
    assert cut.header.tc == 1 and [rr.rtype for rr in cut.ar] == [QTYPE.OPT]


# A plain query's readability is decided without dnslib; it must be dnslib's verdict.
_LABEL = st.binary(min_size=1, max_size=63) | st.text("abcXYZ09-_", min_size=1,
                                                        max_size=63).map(str.encode)


@given(st.lists(_LABEL, max_size=5), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.integers(0, 0x07FF), st.binary(max_size=6), st.integers(0, 1))
def test_screen_takes_a_plain_query_as_dnslib_reads_it(labels, qtype, qclass, flags, tail, ar):
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    wire = struct.pack("!6H", 9, flags, 1, 0, 0, ar) + name + struct.pack("!HH", qtype, qclass)
    if ar:  # an additional section (EDNS0): the other way, through dnslib
        wire += b"\0\0\x29\x04\xd0\0\0\0\0\0\0" if tail else b""  # OPT, 1232 bytes
    wire += tail
    try:
        dnslib_reads = len(DNSRecord.parse(wire).questions) == 1
    except Exception:
        dnslib_reads = False
    fits = len(name) <= 255
    verdict, out = screen(wire)
    assert verdict == ("query" if dnslib_reads and fits else "formerr"), wire.hex()
    if verdict == "query":
        assert isinstance(out, Query) and out.questions[0].labels == tuple(labels)


def test_screen_refuses_a_plain_query_whose_label_is_not_utf8_as_dnslib_does():
    wire = query("x.app.test").replace(b"\x01x", b"\x01\xff")
    assert parse(wire).key is not None  # plain, and read (any byte is in a label)
    verdict, out = screen(wire)
    assert verdict == "formerr" and out[3] & 0xF == RCODE.FORMERR
