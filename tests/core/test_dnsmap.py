"""The client's DNS response mapper: BEHAVIOURS 14-27 (and the API that 28 needs)."""

import ipaddress
import itertools
import struct
import time

import pytest
from dnslib import (
    AAAA,
    CLASS,
    CNAME,
    EDNS0,
    HTTPS,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from dnslib.dns import DNSError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnswire
from conn25.core import dnsname
from conn25.core.assignments import Assignments
from conn25.core.config import App, Member, NodeConfig, Pools, Tailnet
from conn25.core.dnsmap import (
    MAX_CHAIN,
    DNSMapError,
    DNSMapper,
    answer_addresses,
    servfail,
)
from conn25.core.dnsname import DomainIndex
from conn25.core.dnsquery import parse
from conn25.core.iprange import IPRange, IPSet
from nodekeys import public_key

T0 = 1_700_000_000.0
GITHUB = App("GitHub", ("github.com.", "*.github.com."), ("tag:github-connector",))
EXAMPLE = App("Example", ("example.com.",), ("tag:example-connector",))


def ip(s):
    return ipaddress.ip_address(s)


def ipset(*ranges):
    return IPSet.of(IPRange.parse(r) for r in ranges)


def make_pools(v4_magic="100.80.0.0-100.80.3.255",
               v6_magic="fd7a:115c:a1e0:ab12::-fd7a:115c:a1e0:ab12::3ff"):
    return Pools(
        v4_magic=ipset(v4_magic) if v4_magic else IPSet(),
        v6_magic=ipset(v6_magic) if v6_magic else IPSet(),
        v4_transit=ipset("169.254.128.0-169.254.131.255"),
        v6_transit=ipset("fd7a:115c:a1e0:ab13::-fd7a:115c:a1e0:ab13::3ff"),
    )


def make_config(pools=None, tags=(), advertise=False, apps=(GITHUB, EXAMPLE)):
    node = Member("laptop", (ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")), ("192.0.2.1", 41641),
                  public_key("laptop"), tags=tuple(tags))
    return NodeConfig(
        tailnet=Tailnet(nodes=(node,)), node=node, advertise_connector=advertise,
        apps=tuple(apps), pools=pools or make_pools(), app_users=frozenset({node.name}),
    )


class Env:
    def __init__(self, **kw):
        self.config = make_config(**kw)
        self.store = Assignments(self.config.pools)
        self.logs: list[str] = []
        self.mapper = DNSMapper(self.config, self.store, self.logs.append)

    def map(self, wire, now=T0):
        return self.mapper.map_response(wire, now)

    def map_zone(self, text, now=T0):
        """Map an A response for github.com whose answer section is the zone ``text``."""
        return self.map(response("github.com", answers=zone(text)), now)


@pytest.fixture
def env():
    return Env()


def zone(text):
    return RR.fromZone(text)


def response(qname, qtype="A", answers=(), auth=(), ar=(), qclass=CLASS.IN, rcode=0, ad=0):
    qt = getattr(QTYPE, qtype) if isinstance(qtype, str) else qtype
    r = DNSRecord(DNSHeader(id=0x4242, qr=1, rd=1, ra=1, ad=ad, rcode=rcode),
                  q=DNSQuestion(qname, qt, qclass))
    r.add_answer(*answers)
    r.add_auth(*auth)
    r.add_ar(*ar)
    return r.pack()


def query(qname, qtype="A", qclass=CLASS.IN):
    q = DNSRecord(DNSHeader(id=0x5151), q=DNSQuestion(qname, getattr(QTYPE, qtype), qclass))
    return q.pack()


def out_addresses(rec):
    return [ip(repr(rr.rdata)) for rr in rec.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


# -- A and AAAA answers become magic IPs -----------------------------------------------------


def test_a_answers_become_magic_ips_in_pool_order_under_queried_name(env):
    """One magic per real address, in pool order, owned by the queried name."""
    wire = response("github.com", answers=zone(
        "github.com. 300 IN A 203.0.113.10\ngithub.com. 300 IN A 203.0.113.11"))
    res = env.map(wire)
    assert res.ours and res.app == GITHUB and not res.servfail
    out = DNSRecord.parse(res.wire)
    assert out.header.id == 0x4242 and out.header.qr == 1 and out.header.rd == 1
    assert out.header.ra == 1 and out.header.rcode == RCODE.NOERROR
    assert [(str(q.qname), q.qtype) for q in out.questions] == [("github.com.", QTYPE.A)]
    assert [(str(rr.rname), rr.rtype, rr.ttl) for rr in out.rr] == [
        ("github.com.", QTYPE.A, 300)] * 2
    assert out_addresses(out) == [ip("100.80.0.0"), ip("100.80.0.1")]
    assert [(a.magic, a.real, a.app, a.domain) for a in res.new] == [
        (ip("100.80.0.0"), ip("203.0.113.10"), "GitHub", "github.com."),
        (ip("100.80.0.1"), ip("203.0.113.11"), "GitHub", "github.com."),
    ]
    assert res.assignments == res.new


def test_new_assignments_take_the_transit_ips_a_connector_mapped(env):
    """An offer the connector mapped for an address becomes that assignment's transit IP;
    an address without one gets the pool's next."""
    offers = env.store.take_transits(4, 2)
    wire = response("github.com", answers=zone(
        "github.com. 300 IN A 203.0.113.10\ngithub.com. 300 IN A 203.0.113.11"))
    res = env.mapper.map_response(wire, T0, offered={ip("203.0.113.11"): offers[1]})
    assert [a.transit for a in res.new][1] == offers[1]
    assert res.new[0].transit not in offers


def test_aaaa_answers_become_v6_magic_ips(env):
    """AAAA answers the same way, from the v6 magic pool."""
    wire = response("api.github.com", "AAAA", zone(
        "api.github.com. 60 IN AAAA 2001:db8::10\napi.github.com. 60 IN AAAA 2001:db8::11"))
    res = env.map(wire)
    out = DNSRecord.parse(res.wire)
    assert out_addresses(out) == [ip("fd7a:115c:a1e0:ab12::"), ip("fd7a:115c:a1e0:ab12::1")]
    assert all(rr.rtype == QTYPE.AAAA for rr in out.rr)
    assert [a.real for a in res.new] == [ip("2001:db8::10"), ip("2001:db8::11")]
    assert {a.domain for a in res.new} == {"api.github.com."}


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.from_regex(r"[a-zA-Z][a-zA-Z0-9]{0,19}", fullmatch=True), max_size=3),
       st.sampled_from(["A", "AAAA"]), st.integers(0, 0xFFFF), st.booleans(),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8), st.booleans())
def test_an_answer_of_addresses_is_written_as_dnslib_writes_it(labels, qtype, flags, ad, ttls,
                                                               via_cname):
    """Written directly (the name once, a pointer to it in each record), byte for byte."""
    env = Env()
    qname = ".".join([*labels, "GitHub", "com"])
    owner = "edge.cdn.example.net" if via_cname else qname
    rdata = A if qtype == "A" else AAAA
    reals = [f"198.51.100.{i + 1}" if qtype == "A" else f"2001:db8::{i + 1}"
             for i in range(len(ttls))]
    answers = [RR(owner, getattr(QTYPE, qtype), CLASS.IN, ttl, rdata(real))
               for ttl, real in zip(ttls, reals, strict=True)]
    if via_cname:
        answers.insert(0, RR(qname, QTYPE.CNAME, CLASS.IN, 60, CNAME(owner)))
    r = DNSRecord(DNSHeader(id=0x4242, bitmap=flags, qr=1, ad=int(ad)),
                  q=DNSQuestion(qname, getattr(QTYPE, qtype)))
    r.add_answer(*answers)
    wire = r.pack()
    res = env.map(wire)
    assert res.ours and not res.servfail
    want = DNSRecord(DNSHeader(id=0x4242, bitmap=struct.unpack_from("!H", wire, 2)[0] & ~0x20),
                     q=DNSQuestion(DNSLabel(qname), getattr(QTYPE, qtype)))
    want.add_answer(*(RR(DNSLabel(qname), getattr(QTYPE, qtype), CLASS.IN,
                         ttl if ttl < 2**31 else 0, rdata(str(a.magic)))
                      for a, ttl in zip(res.assignments, ttls, strict=True)))
    assert res.wire == bytes(want.pack())


def test_answer_order_decides_pool_order(env):
    """The first answer gets the first free magic IP."""
    wire = response("github.com", answers=zone(
        "github.com. 300 IN A 203.0.113.11\ngithub.com. 300 IN A 203.0.113.10"))
    res = env.map(wire)
    assert [(a.real, a.magic) for a in res.new] == [
        (ip("203.0.113.11"), ip("100.80.0.0")), (ip("203.0.113.10"), ip("100.80.0.1"))]


# -- case ------------------------------------------------------------------------------------


def test_query_name_matches_case_insensitively_and_question_keeps_askers_case(env):
    """Any case maps; the question goes back as asked; the domain key is lower case."""
    wire = response("WwW.GitHub.CoM", answers=zone("www.github.com. 60 IN A 203.0.113.1"))
    res = env.map(wire)
    assert res.app == GITHUB
    assert b"\x03WwW\x06GitHub\x03CoM\x00" in res.wire
    assert out_addresses(DNSRecord.parse(res.wire)) == [ip("100.80.0.0")]
    assert res.new[0].domain == "www.github.com."


def test_chain_names_compare_case_insensitively(env):
    """CNAME owners and targets match whatever their case."""
    wire = response("github.com", answers=zone(
        "GITHUB.com. 60 IN CNAME Edge.Example.NET.\nedge.example.net. 60 IN A 203.0.113.7"))
    res = env.map(wire)
    assert [a.real for a in res.new] == [ip("203.0.113.7")]


# -- what passes untouched, what is dropped ----------------------------------------


def test_non_app_response_passes_byte_for_byte_with_additional_section(env):
    """Other names pass unchanged, additional section (EDNS, glue) included.

    and no assignment is made.
    """
    wire = response("www.example.org", answers=zone("www.example.org. 60 IN A 198.51.100.1"),
                    ar=[EDNS0(udp_len=1232), *zone("ns.example.org. 60 IN A 198.51.100.2")])
    res = env.map(wire)
    assert res.wire == wire and not res.ours and res.new == [] and len(env.store) == 0


def test_rewritten_response_drops_additional_section(env):
    """Glue and the OPT record do not survive a rewrite."""
    wire = response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1"),
                    ar=[EDNS0(udp_len=1232), *zone("ns.github.com. 60 IN A 203.0.113.53")])
    out = DNSRecord.parse(env.map(wire).wire)
    assert out.header.ar == 0 and out.ar == []
    assert out_addresses(out) == [ip("100.80.0.0")]


def _pointer_loop():
    # header (1 question) + a name that is a pointer to itself
    return struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"


@pytest.mark.parametrize("wire", [
    b"",
    b"\x42",
    b"\x00" * 11,
    struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0),  # a question promised, none there
    _pointer_loop(),
    struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\x06github\x03com",  # name never ends
    b"\xff" * 64,
], ids=["empty", "one-byte", "short-header", "missing-question", "pointer-loop", "unterminated",
        "ff"])
def test_unparseable_messages_pass_unchanged(env, wire):
    """What cannot be read is not ours; it passes as it came, without a log line."""
    res = env.map(wire)
    assert res.wire == wire and not res.ours and not res.servfail
    assert len(env.store) == 0


def test_question_of_class_other_than_in_passes_unchanged(env):
    """A CHAOS question for an app name is left alone."""
    wire = response("github.com", answers=[RR("github.com", QTYPE.A, CLASS.CH, 60,
                                               A("203.0.113.1"))], qclass=CLASS.CH)
    res = env.map(wire)
    assert res.wire == wire and not res.ours and len(env.store) == 0


def test_zero_questions_or_several_without_an_app_name_pass_unchanged(env):
    """No question, or several of which none is an app's: passes as it came."""
    none = DNSRecord(DNSHeader(id=7, qr=1), rr=zone("github.com. 60 IN A 203.0.113.1")).pack()
    two = DNSRecord(DNSHeader(id=8, qr=1), questions=[DNSQuestion("example.org"),
                                                      DNSQuestion("api.example.net")],
                    rr=zone("github.com. 60 IN A 203.0.113.1")).pack()
    for wire in (none, two):
        res = env.map(wire)
        assert res.wire == wire and not res.ours
    assert len(env.store) == 0


@pytest.mark.parametrize("names", [["github.com", "api.github.com"], ["example.org", "github.com"]])
def test_several_questions_one_of_an_app_give_servfail(env, names):
    """A question of an app's makes the message ours: SERVFAIL, never the real address."""
    wire = DNSRecord(DNSHeader(id=0x4242, qr=1), questions=[DNSQuestion(n) for n in names],
                     rr=zone("github.com. 60 IN A 203.0.113.1")).pack()
    res = env.map(wire)
    assert res.ours and res.servfail and res.app == GITHUB
    out = DNSRecord.parse(res.wire)
    assert out.header.rcode == RCODE.SERVFAIL and out.rr == []
    assert ip("203.0.113.1").packed not in res.wire
    assert len(env.store) == 0


def test_readable_app_question_before_an_unreadable_one_gives_servfail(env):
    """A readable question under an app domain makes it ours even when the rest is not."""
    head = struct.pack("!HHHHHH", 0x4242, 0x8180, 2, 1, 0, 0)
    wire = head + query("api.github.com")[12:] + b"\x07broken"
    res = env.map(wire)
    assert_servfail(res, "api.github.com.")
    assert env.mapper.app_for_query(wire) == GITHUB


def test_question_label_holding_a_dot_is_not_an_app_name(env):
    """The single label "github.com" is not the name github.com."""
    q = DNSQuestion()
    q.qname = [b"github.com"]
    wire = DNSRecord(DNSHeader(id=9, qr=1), q=q).pack()
    res = env.map(wire)
    assert res.wire == wire and not res.ours


# -- names are matched on their wire labels ------------------------------------------------------

ODD_LABELS = [b"\x01", b"@", b"a\x00b", b"\x00", b"a.b", b".", b"\xff\x80", b"x y", b"-", b"*",
              b"a\\.b", b"\\046", b"_"]


def wire_name(*labels: bytes) -> DNSQuestion:
    q = DNSQuestion()
    q.qname = list(labels)
    return q


def labelled_response(labels, qtype="A", answers=()):
    q = wire_name(*labels)
    q.qtype = getattr(QTYPE, qtype)
    r = DNSRecord(DNSHeader(id=0x4242, qr=1, rd=1, ra=1), q=q)
    r.add_answer(*answers)
    return r.pack()


@pytest.mark.parametrize("odd", ODD_LABELS)
@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_odd_label_under_an_app_wildcard_never_passes_the_real_address(env, odd, qtype):
    """A name whose labels end in an app domain's is the app's whatever bytes the others hold."""
    real = "203.0.113.1" if qtype == "A" else "2001:db8::1"
    labels = (odd, b"API", b"github", b"com")
    rdata = A(real) if qtype == "A" else AAAA(real)
    answer = RR(DNSLabel(labels), getattr(QTYPE, qtype), rdata=rdata, ttl=60)
    wire = labelled_response(labels, qtype, [answer])
    assert env.mapper.app_for_query(wire) == GITHUB
    res = env.map(wire)
    assert res.ours and res.app == GITHUB
    assert ip(real).packed not in res.wire
    if res.servfail:
        # No text form a connector would accept for the name: nothing was reserved.
        # (dnslib cannot parse a non-UTF-8 label, so read the rcode off the header)
        assert res.wire[3] & 0xF == RCODE.SERVFAIL and len(env.store) == 0
        assert struct.unpack_from("!HHH", res.wire, 6) == (0, 0, 0)
    else:
        # Only names with a text form ("*", "_" and "-" labels) are mapped, under that form.
        out = DNSRecord.parse(res.wire)
        assert [a.domain for a in res.assignments] == [
            (odd.decode() + ".api.github.com.")]
        assert all(addr in MAGIC_POOLS.magic(addr.version) for addr in out_addresses(out))


def test_odd_name_under_an_app_domain_with_no_address_gets_an_empty_answer(env):
    """Other types for odd names too: the question echoed and no answer, not SERVFAIL."""
    wire = labelled_response((b"\x00", b"github", b"com"), "TXT")
    res = env.map(wire)
    assert res.ours and not res.servfail
    out = DNSRecord.parse(res.wire)
    assert out.rr == [] and out.q.qname.label == (b"\x00", b"github", b"com")


@pytest.mark.parametrize("labels", [
    (b"github.com",),  # one label: its text looks like the domain, its labels are not
    (b"api.github", b"com"),
    (b"example.com",),
    (b"x", b"example.com"),
    (b"github\\", b"com"),
    (b"github\\.com",),
    (b"github", b"com\x00"),
    (b"github", b"com", b""),
])
def test_labels_that_only_print_like_an_app_domain_are_not_its(env, labels):
    """A label holding a dot byte is one label: no false match through the text form."""
    answer = RR(DNSLabel(labels), QTYPE.A, rdata=A("203.0.113.1"), ttl=60)
    wire = labelled_response(labels, "A", [answer])
    res = env.map(wire)
    assert res.wire == wire and not res.ours
    assert env.mapper.app_for_query(wire) is None


def test_index_lookup_on_wire_labels_and_text_agree():
    """One lookup for text and labels; labels compare ASCII-case-insensitively as bytes."""
    idx = DomainIndex()
    idx.add("*.wild.example.test.", "W")
    idx.add("exact.example.test.", "E")
    assert idx.lookup((b"\x01", b"WILD", b"example", b"test")) == ["W"]
    assert idx.lookup((b"wild", b"example", b"test")) == ["W"]
    assert idx.lookup("x@y.wild.example.test") == ["W"]  # text refused by normalize
    assert idx.lookup((b"EXACT", b"example", b"test")) == ["E"]
    assert idx.lookup((b"a", b"exact", b"example", b"test")) == []
    assert idx.lookup((b"x.wild", b"example", b"test")) == []  # "x.wild" is one label
    assert idx.lookup((b"wild.example", b"test")) == []
    # Only ASCII letters fold: 0xC1 is not 0xE1.
    idx.add("*.xn--x.test.", "X")
    assert idx.lookup((b"\xc1", b"XN--X", b"test")) == ["X"]
    assert idx.lookup((b"xn--\xd8", b"test")) == []


@pytest.mark.parametrize(("labels", "text"), [
    ((b"API", b"GitHub", b"com"), "api.github.com."),
    ((b"*", b"github", b"com"), "*.github.com."),
    ((), "."),
])
def test_from_labels_gives_the_normalised_text(labels, text):
    assert dnsname.from_labels(labels) == text


@pytest.mark.parametrize("labels", [(b"a.b", b"com"), (b"\x00", b"com"), (b"\xc3\xa9", b"com"),
                                    (b" a", b"com"), (b"a", b"*"), (b"@",)])
def test_from_labels_refuses_names_without_a_text_form(labels):
    with pytest.raises(ValueError):
        dnsname.from_labels(labels)


def test_answer_addresses_refuses_an_odd_name():
    """The connector notes no resolution for a name that cannot be registered anyway."""
    wire = labelled_response((b"a.b", b"github", b"com"), "A", [
        RR(DNSLabel((b"a.b", b"github", b"com")), QTYPE.A, rdata=A("203.0.113.1"), ttl=60)])
    with pytest.raises(DNSMapError, match="question name"):
        answer_addresses(wire)


# -- errors once it is ours give SERVFAIL ----------------------------------------------------


def assert_servfail(res, qname, qtype=QTYPE.A):
    assert res.ours and res.servfail
    out = DNSRecord.parse(res.wire)
    assert out.header.rcode == RCODE.SERVFAIL and out.header.id == 0x4242 and out.header.qr == 1
    assert [(str(q.qname), q.qtype) for q in out.questions] == [(qname, qtype)]
    assert out.rr == [] and out.auth == [] and out.ar == []


def test_parse_error_in_answers_gives_servfail(env):
    """A truncated answer section for an app name is SERVFAIL, with a logged reason."""
    wire = response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1"))
    res = env.map(wire[:-2])
    assert_servfail(res, "github.com.")
    assert len(env.logs) == 1 and "SERVFAIL" in env.logs[0] and "github.com." in env.logs[0]
    assert "GitHub" in env.logs[0]
    assert len(env.store) == 0


@pytest.mark.parametrize("delta", [-1, 1])
def test_address_record_whose_data_disagrees_with_rdlength_gives_servfail(env, delta):
    """RDLENGTH 3 or 5 for an A record is malformed, not read as an address."""
    wire = bytearray(response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1")))
    rdlength_at = len(wire) - 6
    wire[rdlength_at:rdlength_at + 2] = struct.pack("!H", 4 + delta)
    wire = bytes(wire[:-1]) if delta < 0 else bytes(wire) + b"\x00"
    res = env.map(wire)
    assert_servfail(res, "github.com.")
    assert len(env.store) == 0


def test_rdlength_past_the_end_gives_servfail(env):
    """A record claiming more data than the message holds."""
    wire = bytearray(response("github.com", answers=zone("github.com. 60 IN TXT hello")))
    wire[-8:-6] = struct.pack("!H", 200)
    assert_servfail(env.map(bytes(wire)), "github.com.")


def test_pool_exhaustion_gives_servfail_and_reports_assignments_made():
    """An exhausted pool is SERVFAIL, never the real address; those made are reported."""
    env = Env(pools=make_pools(v4_magic="100.80.0.0-100.80.0.1"))
    wire = response("github.com", answers=zone(
        "github.com. 60 IN A 203.0.113.1\ngithub.com. 60 IN A 203.0.113.2\n"
        "github.com. 60 IN A 203.0.113.3"))
    res = env.map(wire)
    assert_servfail(res, "github.com.")
    assert [a.real for a in res.new] == [ip("203.0.113.1"), ip("203.0.113.2")]
    assert "PoolExhausted" in env.logs[0]
    for real in ("203.0.113.1", "203.0.113.2", "203.0.113.3"):
        assert ip(real).packed not in res.wire


def test_unconfigured_v6_pool_gives_servfail_for_aaaa():
    """No v6 magic pool, an AAAA answer for an app name is SERVFAIL."""
    env = Env(pools=make_pools(v6_magic=None))
    res = env.map(response("github.com", "AAAA", zone("github.com. 60 IN AAAA 2001:db8::1")))
    assert_servfail(res, "github.com.", QTYPE.AAAA)
    assert ip("2001:db8::1").packed not in res.wire


def test_servfail_keeps_no_partial_answer(env):
    """A bad record after good ones still gives SERVFAIL, not the good part."""
    wire = response("github.com", answers=zone(
        "github.com. 60 IN A 203.0.113.1\ngithub.com. 60 IN A 203.0.113.2"))
    res = env.map(wire[:-1])
    assert_servfail(res, "github.com.")


# -- the CNAME chain ---------------------------------------------------------------


def test_records_of_other_class_name_or_family_are_dropped(env):
    """Other class, a name off the chain, the other family: all dropped."""
    answers = [
        *zone("github.com. 60 IN A 203.0.113.1"),
        RR("github.com", QTYPE.A, CLASS.CH, 60, A("203.0.113.2")),
        *zone("unrelated.example.net. 60 IN A 198.51.100.3"),
        *zone("github.com. 60 IN AAAA 2001:db8::4"),
        *zone('github.com. 60 IN TXT "v=spf1"'),
    ]
    res = env.map(response("github.com", answers=answers))
    out = DNSRecord.parse(res.wire)
    assert [rr.rtype for rr in out.rr] == [QTYPE.A]
    assert [a.real for a in res.new] == [ip("203.0.113.1")]


@pytest.mark.parametrize(("qtype", "rtype", "reals"), [
    ("A", "A", ["203.0.113.20", "198.51.100.21"]),
    ("AAAA", "AAAA", ["2001:db8::20", "2001:db8:1::21"]),
])
def test_cname_chain_followed_over_several_hops_and_collapsed(env, qtype, rtype, reals):
    """Three hops, listed out of order; out come only address records, queried name."""
    answers = zone(
        f"c.example.net. 30 IN {rtype} {reals[0]}\n"
        "b.example.net. 300 IN CNAME c.example.net.\n"
        "www.github.com. 300 IN CNAME a.example.net.\n"
        f"c.example.net. 30 IN {rtype} {reals[1]}\n"
        "a.example.net. 300 IN CNAME b.example.net.\n"
    )
    res = env.map(response("www.github.com", qtype, answers))
    out = DNSRecord.parse(res.wire)
    assert {rr.rtype for rr in out.rr} == {getattr(QTYPE, qtype)}
    assert {str(rr.rname) for rr in out.rr} == {"www.github.com."}
    assert [a.real for a in res.new] == [ip(r) for r in reals]
    assert out_addresses(out) == [a.magic for a in res.new]


def test_broken_chain_gives_empty_answer(env):
    """The chain ends at a name with no address; addresses of other names are not used."""
    res = env.map_zone("github.com. 60 IN CNAME x.example.net.\ny.example.net. 60 IN A 203.0.113.1")
    out = DNSRecord.parse(res.wire)
    assert not res.servfail and out.rr == [] and out.header.rcode == RCODE.NOERROR
    assert len(env.store) == 0


@pytest.mark.parametrize("ring", [1, 2, 3, 200])
def test_cname_loop_gives_empty_answer_quickly(env, ring):
    """A loop (a self-loop too) ends the walk: empty answer, no hang."""
    names = ["github.com."] + [f"n{i}.example.net." for i in range(1, ring)]
    text = "".join(f"{n} 60 IN CNAME {names[(i + 1) % ring]}\n" for i, n in enumerate(names))
    text += "".join(f"{n} 60 IN A 203.0.113.{i + 1}\n" for i, n in enumerate(names[:50]))
    start = time.perf_counter()
    res = env.map_zone(text)
    assert time.perf_counter() - start < 2.0
    assert DNSRecord.parse(res.wire).rr == [] and not res.servfail and len(env.store) == 0


def test_chain_longer_than_max_hops_counts_as_broken(env):
    """MAX_CHAIN hops are followed, one more is not."""
    def chain(hops):
        names = ["github.com."] + [f"h{i}.example.net." for i in range(1, hops + 1)]
        text = "".join(f"{a} 60 IN CNAME {b}\n" for a, b in itertools.pairwise(names))
        return response("github.com", answers=zone(text + f"{names[-1]} 60 IN A 203.0.113.9"))

    assert len(DNSRecord.parse(env.map(chain(MAX_CHAIN)).wire).rr) == 1
    assert DNSRecord.parse(env.map(chain(MAX_CHAIN + 1)).wire).rr == []


def test_several_names_pointing_at_one_target(env):
    """Two names CNAME'd to one target: the queried one's chain still resolves."""
    res = env.map_zone(
        "other.example.net. 60 IN CNAME edge.example.net.\n"
        "github.com. 60 IN CNAME edge.example.net.\n"
        "edge.example.net. 60 IN A 203.0.113.5\n"
    )
    assert [a.real for a in res.new] == [ip("203.0.113.5")]


# -- HTTPS -----------------------------------------------------------------------------------


def https_rdata(params, priority=1, target=()):
    return HTTPS(priority, list(target), [(k, bytearray(v)) for k, v in params])


ALPN = b"\x02h2\x02h3"
V4HINT = ip("203.0.113.80").packed + ip("203.0.113.81").packed
V6HINT = ip("2001:db8::80").packed


def test_https_hints_removed_other_params_and_ttl_kept(env):
    """Ipv4hint and ipv6hint go (also from "mandatory"); alpn, port, TTL stay."""
    params = [(0, struct.pack("!HH", 1, 4)), (1, ALPN), (3, struct.pack("!H", 8443)),
              (4, V4HINT), (6, V6HINT)]
    wire = response("github.com", "HTTPS", [RR("github.com", QTYPE.HTTPS, ttl=77,
                                                   rdata=https_rdata(params))], ad=1)
    res = env.map(wire)
    out = DNSRecord.parse(res.wire)
    assert len(out.rr) == 1 and out.rr[0].ttl == 77 and str(out.rr[0].rname) == "github.com."
    assert [(k, bytes(v)) for k, v in out.rr[0].rdata.params] == [
        (0, struct.pack("!H", 1)), (1, ALPN), (3, struct.pack("!H", 8443))]
    assert out.header.ad == 0  # The records are ours now
    assert V4HINT[:4] not in res.wire and V4HINT[4:] not in res.wire and V6HINT not in res.wire
    assert len(env.store) == 0


def test_https_mandatory_listing_only_hints_is_dropped(env):
    """A "mandatory" left empty would make the record invalid, so it goes."""
    params = [(0, struct.pack("!HH", 4, 6)), (1, ALPN), (4, V4HINT), (6, V6HINT)]
    wire = response("github.com", "HTTPS", [RR("github.com", QTYPE.HTTPS, ttl=5,
                                                   rdata=https_rdata(params))])
    out = DNSRecord.parse(env.map(wire).wire)
    assert [(k, bytes(v)) for k, v in out.rr[0].rdata.params] == [(1, ALPN)]


def test_https_behind_cname_goes_out_under_queried_name(env):
    """HTTPS records at the end of the chain, owned by the queried name, no CNAME."""
    answers = [*zone("www.github.com. 60 IN CNAME edge.example.net."),
               RR("edge.example.net", QTYPE.HTTPS, ttl=120,
                  rdata=https_rdata([(1, ALPN), (4, V4HINT)])),
               RR("off.example.net", QTYPE.HTTPS, ttl=120, rdata=https_rdata([(1, ALPN)]))]
    out = DNSRecord.parse(env.map(response("www.github.com", "HTTPS", answers)).wire)
    assert [(str(rr.rname), rr.rtype, rr.ttl) for rr in out.rr] == [
        ("www.github.com.", QTYPE.HTTPS, 120)]
    assert [k for k, _ in out.rr[0].rdata.params] == [1]


def test_https_malformed_mandatory_gives_servfail(env):
    """A "mandatory" value of odd length cannot be edited safely."""
    wire = response("github.com", "HTTPS", [RR("github.com", QTYPE.HTTPS, ttl=5,
                                                   rdata=https_rdata([(0, b"\x00"), (4, V4HINT)]))])
    res = env.map(wire)
    assert_servfail(res, "github.com.", QTYPE.HTTPS)
    assert "mandatory" in env.logs[0]


# -- other types -----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["NS", "CNAME", "SOA", "PTR", "MX", "TXT", "SRV", "SVCB", "ANY",
                                   "DS", 12345])
def test_other_types_get_question_echoed_and_no_answer(env, qtype):
    """Whatever upstream answered, an app name of another type gets no answer records."""
    answers = zone(
        "github.com. 60 IN CNAME edge.example.net.\n"
        "github.com. 60 IN MX 10 mx.github.com.\n"
        'github.com. 60 IN TXT "hello"\n'
        "edge.example.net. 60 IN A 203.0.113.1\n"
    )
    res = env.map(response("github.com", qtype, answers,
                           ar=zone("mx.github.com. 60 IN A 203.0.113.25")))
    qt = getattr(QTYPE, qtype) if isinstance(qtype, str) else qtype
    out = DNSRecord.parse(res.wire)
    assert res.ours and not res.servfail
    assert [(str(q.qname), q.qtype) for q in out.questions] == [("github.com.", qt)]
    assert out.rr == [] and out.ar == [] and out.header.rcode == RCODE.NOERROR
    assert ip("203.0.113.1").packed not in res.wire and len(env.store) == 0


# -- TTL -------------------------------------------------------------------------------------


def test_ttl_is_the_address_records_not_the_cnames(env):
    """Each answer carries its own address record's TTL; the expiry follows it."""
    res = env.map_zone(
        "github.com. 3600 IN CNAME edge.example.net.\n"
        "edge.example.net. 42 IN A 203.0.113.1\n"
        "edge.example.net. 900 IN A 203.0.113.2\n"
    )
    assert [rr.ttl for rr in DNSRecord.parse(res.wire).rr] == [42, 900]
    assert [a.expiry for a in res.new] == [T0 + 60, T0 + 900]  # 42 clamps to the 1-minute floor


def test_ttl_with_top_bit_set_counts_as_zero(env):
    """B25 (RFC 2181 §8): a TTL over 2**31-1 is read as 0, not as 68 years."""
    res = env.map(response("github.com", answers=[RR("github.com", QTYPE.A, ttl=2**31 + 5,
                                                       rdata=A("203.0.113.1"))]))
    assert DNSRecord.parse(res.wire).rr[0].ttl == 0


# -- assignments -----------------------------------------------------------------------------


def test_one_assignment_per_domain_and_real_address(env):
    """A repeated address is answered once; a repeated answer reuses the assignment."""
    wire = response("github.com", answers=zone(
        "github.com. 60 IN A 203.0.113.1\ngithub.com. 90 IN A 203.0.113.1"))
    first = env.map(wire)
    assert len(first.new) == 1 and len(env.store) == 1
    assert [rr.ttl for rr in DNSRecord.parse(first.wire).rr] == [60]
    second = env.map(wire, now=T0 + 30)
    assert second.new == [] and second.assignments == first.new
    assert out_addresses(DNSRecord.parse(second.wire)) == [first.new[0].magic]
    assert len(env.store) == 1 and env.store.by_magic(first.new[0].magic).expiry == T0 + 30 + 60


def test_each_domain_gets_its_own_assignment_with_its_app(env):
    """(domain, real) is the key; the app is the one the name maps to."""
    a = env.map(response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1")))
    b = env.map(response("api.github.com", answers=zone("api.github.com. 60 IN A 203.0.113.1")))
    c = env.map(response("example.com", answers=zone("example.com. 60 IN A 203.0.113.1")))
    got = [(x.new[0].domain, x.new[0].app) for x in (a, b, c)]
    assert got == [("github.com.", "GitHub"), ("api.github.com.", "GitHub"),
                   ("example.com.", "Example")]
    assert len({x.new[0].magic for x in (a, b, c)}) == 3


def test_name_this_node_serves_as_connector_passes_unchanged():
    """A connector for the app maps nothing for its names, and creates nothing."""
    env = Env(tags=("tag:github-connector",), advertise=True)
    wire = response("www.github.com", answers=zone("www.github.com. 60 IN A 203.0.113.1"))
    res = env.map(wire)
    assert res.wire == wire and not res.ours and len(env.store) == 0
    assert env.mapper.app_for_query(query("www.github.com")) is None
    # its other apps are still mapped
    assert env.map(response("example.com", answers=zone("example.com. 60 IN A 203.0.113.1"))).ours


# -- a CNAME-only answer to AAAA gives an empty answer, never the real address ----------------


def test_cname_only_aaaa_answer_gives_empty_answer_never_the_real_address(env):
    """AAAA with only a CNAME (an A further on): no answer, no assignment, no real address."""
    answers = zone("github.com. 60 IN CNAME edge.example.net.\n"
                   "edge.example.net. 60 IN A 203.0.113.1")
    res = env.map(response("github.com", "AAAA", answers))
    out = DNSRecord.parse(res.wire)
    assert res.ours and out.rr == [] and len(env.store) == 0
    assert ip("203.0.113.1").packed not in res.wire and b"edge" not in res.wire


# -- authority and header -------------------------------------------------------------------------

SOA_RR = RR("github.com", QTYPE.SOA, ttl=900, rdata=SOA("ns1.github.com", "hostmaster.github.com",
                                                         (1, 3600, 600, 86400, 300)))


def test_empty_answer_keeps_soa_and_rcode_drops_other_authority(env):
    """(design): an empty answer keeps the SOA (negative caching) and the rcode; NS goes."""
    wire = response("nope.github.com", answers=(), rcode=RCODE.NXDOMAIN,
                    auth=[SOA_RR, *zone("github.com. 900 IN NS ns1.github.com.")])
    out = DNSRecord.parse(env.map(wire).wire)
    assert out.header.rcode == RCODE.NXDOMAIN
    assert [rr.rtype for rr in out.auth] == [QTYPE.SOA] and out.rr == []


def test_nonempty_answer_drops_authority(env):
    """(design): with answers, the authority section goes too."""
    wire = response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1"), auth=[SOA_RR])
    out = DNSRecord.parse(env.map(wire).wire)
    assert out.auth == [] and len(out.rr) == 1


def test_rewrite_clears_ad_keeps_other_flags(env):
    """(design): AD is cleared on our records; id, RD, RA, AA stay as upstream sent them."""
    r = DNSRecord(DNSHeader(id=99, qr=1, aa=1, rd=1, ra=1, ad=1), q=DNSQuestion("github.com"),
                  rr=zone("github.com. 60 IN A 203.0.113.1"))
    out = DNSRecord.parse(env.map(r.pack()).wire)
    assert (out.header.id, out.header.aa, out.header.rd, out.header.ra, out.header.ad) == (
        99, 1, 1, 1, 0)


# -- app_for_query --------------------------------------------------------------------------------


def test_app_for_query(env):
    """A query is ours when an IN question it has maps to an app (any case)."""
    m = env.mapper
    assert m.app_for_query(query("GitHub.com")) == GITHUB
    assert m.app_for_query(query("deep.api.github.com", "AAAA")) == GITHUB
    assert m.app_for_query(query("example.com", "MX")) == EXAMPLE
    assert m.app_for_query(query("www.example.org")) is None
    assert m.app_for_query(query("github.com", qclass=CLASS.CH)) is None
    assert m.app_for_query(b"\x00\x01\x02") is None
    two = DNSRecord(DNSHeader(id=1), questions=[DNSQuestion("example.org"),
                                                DNSQuestion("github.com")]).pack()
    assert m.app_for_query(two) == GITHUB  # an app's question among several is still the app's
    assert m.app_for_query(query("api.github.com")[:-5]) is None  # its question cut short


# -- servfail() -----------------------------------------------------------------------------------


def test_servfail_answers_a_query_echoing_its_question():
    """SERVFAIL for the query (what the client answers when the connector does not ack in
    time): question and id kept."""
    out = DNSRecord.parse(servfail(query("GitHub.com", "AAAA")))
    assert out.header.id == 0x5151 and out.header.qr == 1 and out.header.rd == 1
    assert out.header.rcode == RCODE.SERVFAIL
    assert [(str(q.qname), q.qtype) for q in out.questions] == [("GitHub.com.", QTYPE.AAAA)]
    assert out.rr == [] and out.auth == [] and out.ar == []


def test_servfail_from_a_response_drops_its_records():
    wire = response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1"))
    out = DNSRecord.parse(servfail(wire))
    assert out.header.rcode == RCODE.SERVFAIL and out.rr == []
    assert ip("203.0.113.1").packed not in servfail(wire)


def test_servfail_with_unreadable_question_has_none_and_bad_header_is_an_error():
    broken = struct.pack("!HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\x05abc"
    out = DNSRecord.parse(servfail(broken))
    assert out.header.id == 77 and out.header.rcode == RCODE.SERVFAIL and out.questions == []
    with pytest.raises(DNSMapError, match="header"):
        servfail(b"\x00\x01")


# -- answer_addresses -----------------------------------------------------------------------------


def test_answer_addresses_walks_the_chain_from_wire_or_record():
    """The shared chain walk, for the connector too."""
    r = DNSRecord(DNSHeader(id=1, qr=1), q=DNSQuestion("WWW.GitHub.com"), rr=zone(
        "www.github.com. 300 IN CNAME edge.example.net.\n"
        "edge.example.net. 20 IN A 203.0.113.1\n"
        "edge.example.net. 20 IN A 203.0.113.1\n"
        "edge.example.net. 30 IN A 198.51.100.2\n"
        "edge.example.net. 30 IN AAAA 2001:db8::1\n"))
    expected = ("www.github.com.", QTYPE.A, [(ip("203.0.113.1"), 20), (ip("198.51.100.2"), 30)])
    assert answer_addresses(r.pack()) == expected
    assert answer_addresses(r) == expected


def test_answer_addresses_gives_none_for_other_types_and_loops():
    mx = response("github.com", "MX", zone("github.com. 60 IN MX 10 mx.github.com."))
    assert answer_addresses(mx) == ("github.com.", QTYPE.MX, [])
    loop = response("github.com", answers=zone("github.com. 60 IN CNAME github.com.\n"
                                               "github.com. 60 IN A 203.0.113.1"))
    assert answer_addresses(loop)[2] == []


@pytest.mark.parametrize(("wire", "message"), [
    (b"\x01\x02\x03", "unreadable"),
    (DNSRecord(DNSHeader(id=1, qr=1)).pack(), "0 questions"),
    (response("github.com", qclass=CLASS.CH), "class"),
    (response("github.com", answers=zone("github.com. 60 IN A 203.0.113.1"))[:-1], "unreadable"),
])
def test_answer_addresses_refuses_what_it_cannot_read(wire, message):
    with pytest.raises(DNSMapError, match=message):
        answer_addresses(wire)


# -- hypothesis -----------------------------------------------------------------------------------

REAL_V4 = [f"203.0.113.{i}" for i in range(1, 9)] + [f"198.51.100.{i}" for i in range(1, 5)]
REAL_V6 = [f"2001:db8::{i:x}" for i in range(1, 9)] + ["2001:db8:ffff::1"]
NAMES = ["www.github.com.", "a.example.net.", "b.example.net.", "c.example.net.",
         "other.example.org."]
MAGIC_POOLS = make_pools()

SEED_RESPONSES = [
    response("www.github.com", answers=zone(
        "www.github.com. 60 IN CNAME a.example.net.\na.example.net. 30 IN A 203.0.113.1\n"
        "a.example.net. 30 IN A 198.51.100.2"), ar=[EDNS0(udp_len=1232)]),
    response("github.com", "AAAA", zone("github.com. 60 IN AAAA 2001:db8::1")),
    response("github.com", "HTTPS", [RR("github.com", QTYPE.HTTPS, ttl=7, rdata=https_rdata(
        [(1, ALPN), (4, ip("203.0.113.3").packed), (6, ip("2001:db8::3").packed)]))]),
]
SEED_REALS = {ip("203.0.113.1"), ip("198.51.100.2"), ip("2001:db8::1"), ip("203.0.113.3"),
              ip("2001:db8::3")}


def _check_output(env, res, input_reals, came_from_input):
    """Whatever we produced for an app name: parseable, only magic IPs, none of the real ones."""
    out = DNSRecord.parse(res.wire)
    for addr in out_addresses(out):
        assert addr not in input_reals
        assignment = env.store.by_magic(addr)
        assert assignment is not None and came_from_input(assignment.real)
        assert addr in MAGIC_POOLS.magic(addr.version)
    for rr in out.rr:
        if rr.rtype == QTYPE.HTTPS:
            assert all(k not in (4, 6) for k, _ in rr.rdata.params)
    return out


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    """Arbitrary bytes never escape as an exception."""
    env = Env()
    res = env.map(data)
    assert isinstance(res.wire, bytes)
    if not res.ours:
        assert res.wire == data
    assert isinstance(env.mapper.app_for_query(data), App | None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEED_RESPONSES),
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       st.integers(0, 400))
def test_mutated_app_responses_never_raise_or_leak(seed, edits, cut):
    """Corrupted app-name responses give a rewrite or SERVFAIL, never a real address."""
    wire = bytearray(seed)
    for pos, byte in edits:
        if pos < len(wire):
            wire[pos] = byte
    wire = bytes(wire[: max(cut, 12)])
    env = Env()
    res = env.map(wire)
    if not res.ours:
        assert res.wire == wire
        return
    if res.servfail:
        assert res.wire[3] & 0xF == RCODE.SERVFAIL
        assert struct.unpack_from("!HHHH", res.wire, 4)[1:] == (0, 0, 0)  # no records at all
        assert struct.unpack_from("!H", res.wire, 4)[0] <= 1
        return
    try:
        DNSRecord.parse(res.wire)
    except DNSError:
        # The question may hold labels dnslib cannot read (any byte is allowed there).
        datas = dnswire.address_data(res.wire)
        assert all(ip(d) in MAGIC_POOLS.magic(ip(d).version) for d in datas), res.wire.hex()
        return
    # a mutation may have changed an address: the real one must still be from the input
    _check_output(env, res, SEED_REALS, lambda real: real.packed in wire)


_name = st.sampled_from(NAMES).flatmap(
    lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
        lambda up: "".join(c.upper() if u else c for c, u in zip(n, up, strict=True))))
_record = st.one_of(
    st.tuples(st.just("CNAME"), _name, _name),
    st.tuples(st.just("A"), _name, st.sampled_from(REAL_V4)),
    st.tuples(st.just("AAAA"), _name, st.sampled_from(REAL_V6)),
)


def _rr(kind, owner, value, ttl):
    rdata = {"CNAME": CNAME, "A": A, "AAAA": AAAA}[kind](value)
    return RR(owner, getattr(QTYPE, kind), ttl=ttl, rdata=rdata)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["A", "AAAA"]), _name,
       st.lists(st.tuples(_record, st.integers(0, 100_000)), max_size=12))
def test_random_answer_sets_map_only_to_magic_ips(qtype, qname, records):
    """Output addresses are all magic IPs of assignments for input addresses."""
    qname = "www.github.com." if qname.lower() != "www.github.com." else qname
    answers = [_rr(kind, owner, value, ttl) for (kind, owner, value), ttl in records]
    input_reals = {ip(v) for (kind, _, v), _ in records if kind != "CNAME"}
    env = Env()
    res = env.map(response(qname, qtype, answers))
    assert res.ours and not res.servfail
    out = _check_output(env, res, input_reals, input_reals.__contains__)
    qt = getattr(QTYPE, qtype)
    assert all(rr.rtype == qt and str(rr.rname).lower() == "www.github.com." for rr in out.rr)
    magics = out_addresses(out)
    assert len(magics) == len(set(magics)) == len(res.assignments) == len(env.store)
    assert {a.domain for a in res.assignments} <= {"www.github.com."}
    assert all(a.app == "GitHub" for a in res.assignments)
    if not any(kind == "CNAME" for (kind, _, _), _ in records):
        # no chain to follow: exactly the queried name's own records of the asked type
        direct = [ip(v) for (kind, owner, v), _ in records
                  if kind == qtype and owner.lower() == "www.github.com."]
        assert [a.real for a in res.assignments] == list(dict.fromkeys(direct))


def test_servfail_for_a_message_with_garbage_questions_echoes_only_the_app_question(env):
    """Found by fuzzing: QDCOUNT raised to 257 made answer records read as questions.

    SERVFAIL must not echo them: one held the real address's bytes as a label.
    """
    wire = bytearray(response("www.github.com", answers=zone(
        "www.github.com. 60 IN CNAME a.example.net.\na.example.net. 30 IN A 203.0.113.1")))
    wire[4] = 1  # QDCOUNT 257
    res = env.map(bytes(wire))
    assert res.ours and res.servfail
    assert ip("203.0.113.1").packed not in res.wire
    assert_servfail(res, "www.github.com.")


def test_question_name_with_a_forward_pointer_is_read_as_a_stub_reads_it(env):
    """Stub resolvers follow a pointer forwards too: such an app question is ours."""
    head = struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0)
    # question: "api" then a pointer to "github.com" placed after the question
    question = b"\x03api\xc0\x16" + b"\x00\x01\x00\x01"
    tail = b"\x06github\x03com\x00"
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + ip("203.0.113.1").packed
    wire = head + question + tail + answer
    assert wire[0x16:0x16 + 7] == b"\x06github"
    res = env.map(wire)
    assert res.ours and ip("203.0.113.1").packed not in res.wire


def test_question_name_over_255_octets_is_unreadable_and_passes(env):
    """RFC 1035 §2.3.4: no resolver reads it as a name, so it is no app's either."""
    def message(first: int) -> bytes:
        name = b"".join(bytes([n]) + b"a" * n for n in (63, 63, 63, first))
        return (struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + name
                + b"\x06github\x03com\x00\x00\x01\x00\x01")

    too_long = message(51)
    assert len(too_long) - 12 - 4 == 256
    res = env.map(too_long)
    assert res.wire == too_long and not res.ours
    assert env.map(message(50)).ours  # 255 octets: a name, the app's


def test_thousands_of_questions_are_not_all_read():
    """Only the first questions are looked at; an app question among them makes it SERVFAIL."""
    name = b"".join(b"\x01a" for _ in range(120)) + b"\x06github\x03com\x00"
    many = b"\xc0\x0c\x00\x01\x00\x01" * 10_000
    wire = struct.pack("!HHHHHH", 0x4242, 0x8180, 10_001, 0, 0, 0) + name + b"\x00\x01\x00\x01"
    env = Env()
    res = env.map(wire + many)
    assert res.ours and res.servfail
    other = wire.replace(b"\x06github", b"\x06gitlab")
    res = env.map(other + many)
    assert not res.ours and res.wire == other + many


def test_app_for_takes_the_parsed_query_and_agrees_with_app_for_query(env):
    m = env.mapper
    for wire in (query("GitHub.com"), query("www.example.org"),
                 query("github.com", qclass=CLASS.CH)):
        assert m.app_for(parse(wire)) == m.app_for_query(wire)
    assert m.app_for(parse(query("deep.api.github.com", "AAAA"))) == GITHUB
