"""The client's DNS response mapper: app domains answer with magic IPs.

A response is *ours* when one of the questions that can be read is of class
IN and its name maps to an app (``NodeConfig.mapping_app``: exact beats
wildcard, and a connector never maps the apps it serves). Names are matched on
their wire labels, so a name whose last labels are an app's domain is the
app's whatever bytes its other labels hold. Everything else passes byte for
byte. A response that is ours but has other than exactly one question, or a
question that cannot be read, is SERVFAIL. Once a response is ours the caller
gets a new message, never the upstream one:

* header: id and flags as upstream (rcode too), except AD, which is cleared
  because the records are ours and no longer what was validated;
* question: echoed as asked (the asker's case is kept);
* A/AAAA: the CNAME chain is followed from the queried name and collapsed;
  each real address of the question's type on the chain gets an assignment
  and is answered as ``queried-name A|AAAA magic`` with the address record's
  TTL, in answer order; no CNAME goes out. A name that has no text form that
  a connector would accept (see ``dnsname.from_labels``) cannot be
  registered, so its addresses give SERVFAIL;
* HTTPS: the records on the chain go out under the queried name with their
  ipv4hint/ipv6hint removed (a client must not learn real addresses there);
* any other type: no answer records;
* authority: dropped, except SOA records when the answer section comes out
  empty, so that the asker can still cache the negative answer (RFC 2308);
* additional (glue, EDNS OPT, DNSSEC): dropped.

Any error after the response became ours (a malformed record, an exhausted
pool) gives SERVFAIL for the question: never a crash, never the real address.

Only the record types we use are parsed (by dnslib); the others are stepped
over by their RDLENGTH. That also makes RDLENGTH authoritative, which dnslib
alone does not check for A and AAAA.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping

import msgspec
from dnslib import AAAA, CLASS, HTTPS, QTYPE, RR, A, DNSHeader, DNSQuestion, DNSRecord
from dnslib.bimap import BimapError
from dnslib.buffer import BufferError
from dnslib.dns import RD, RDMAP, DNSError
from dnslib.label import DNSBuffer, DNSLabel

from . import dnsname, dnsquery
from .assignments import Assignment, Assignments
from .config import App, NodeConfig
from .dnsquery import MAX_NAME, MAX_POINTERS, MAX_QUESTIONS, DNSMapError, Query, servfail_from
from .iprange import IPAddress

__all__ = [
    "MAX_CHAIN",
    "MAX_NAME",
    "MAX_POINTERS",
    "MAX_QUESTIONS",
    "DNSMapError",
    "DNSMapper",
    "MapResult",
    "answer_addresses",
    "query_question",
    "servfail",
]

TYPE_A = QTYPE.A  # 1
TYPE_AAAA = QTYPE.AAAA  # 28
TYPE_CNAME = QTYPE.CNAME  # 5
TYPE_SOA = QTYPE.SOA  # 6
TYPE_HTTPS = QTYPE.HTTPS  # 65
CLASS_IN = CLASS.IN

MAX_CHAIN = 16  # CNAME hops followed; a longer chain counts as broken
SVC_MANDATORY, SVC_IPV4HINT, SVC_IPV6HINT = 0, 4, 6
_HINTS = frozenset((SVC_IPV4HINT, SVC_IPV6HINT))
_MAX_TTL = 2**31 - 1  # RFC 2181 §8: a TTL with the top bit set means zero

_ANSWER_TYPES = frozenset((TYPE_A, TYPE_AAAA, TYPE_CNAME, TYPE_HTTPS))
_AUTHORITY_TYPES = frozenset((TYPE_SOA,))


class MapResult(msgspec.Struct, frozen=True):
    """What :meth:`DNSMapper.map_response` made of a response.

    ``app`` is None when the response was not ours; ``wire`` is then the
    input, unchanged. ``new`` lists the assignments created by this call,
    which the caller registers with a connector (and, unless ``servfail``,
    waits for before sending ``wire``). It is filled even on SERVFAIL, so
    that no assignment is left unregistered. ``assignments`` are all the
    assignments in the answer, in answer order (new or reused).
    """

    wire: bytes
    app: App | None = None
    new: list[Assignment] = []
    assignments: list[Assignment] = []
    servfail: bool = False

    @property
    def ours(self) -> bool:
        return self.app is not None


class DNSMapper:
    """Maps DNS responses for app domains onto magic IPs (sans-IO).

    ``config`` may be replaced by the caller when the configuration is
    reloaded; the next call uses the new one.
    """

    def __init__(
        self,
        config: NodeConfig,
        assignments: Assignments,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.assignments = assignments
        self._log = log or (lambda _msg: None)

    def app_for(self, query: Query) -> App | None:
        """The app whose domain ``query`` asks about, or None when it is not ours.

        Decided as for a response: any readable class-IN question of an app's.
        A name longer than MAX_NAME is unreadable here, and so are the
        questions after it.
        """
        for q in query.questions:
            if q.size > MAX_NAME:
                return None
            if q.qclass == CLASS_IN and (app := self.config.mapping_app(q.labels)):
                return app
        return None

    def app_for_query(self, wire: bytes) -> App | None:
        """:meth:`app_for` of the wire message ``wire``; None when it has no header."""
        try:
            return self.app_for(dnsquery.parse(wire))
        except DNSMapError:
            return None

    def map_response(self, wire: bytes, now: float, head: Query | None = None,
                     offered: Mapping[IPAddress, IPAddress] | None = None) -> MapResult:
        """Rewrite an upstream response for an app domain (see the module docstring).

        ``head`` is :func:`conn25.core.dnsquery.parse` of ``wire`` when the caller
        read it already (to check that it answers the query), so that it is not
        read twice. ``offered`` (real address -> transit IP) names the transit IPs
        a connector mapped already, for the assignments this answer creates.
        """
        try:
            buf, header, questions, complete = _read_head(wire, head)
        except Exception:
            return MapResult(wire)  # not even a header: not ours
        found = self._app(questions)
        if found is None:
            return MapResult(wire)  # no question of an app's that can be read
        app, question = found
        if not complete or len(questions) != 1:
            # An app's question makes it ours, whatever else the message holds. Only that
            # question is echoed: the others may be any bytes, records misread among them.
            self._log(f"dns: SERVFAIL for {question.qname} (app {app.name}): "
                      f"{header.q} questions, {len(questions)} readable")
            return MapResult(servfail_from(header, [question]), app, servfail=True)
        new: list[Assignment] = []
        used: list[Assignment] = []
        try:
            answers = _parse_records(buf, header.a, _ANSWER_TYPES, "answer")
            authority = _parse_records(buf, header.auth, _AUTHORITY_TYPES, "authority")
            records = self._answer(app, question, answers, now, new, used, offered or {})
            soa = [] if records else [rr for rr in authority if rr.rclass == CLASS_IN]
            out_header = DNSHeader(id=header.id, bitmap=header.bitmap)
            out_header.ad = 0
            out = DNSRecord(out_header, questions=[question], rr=records, auth=soa).pack()
        except Exception as e:
            self._log(
                f"dns: SERVFAIL for {question.qname} {_type_name(question.qtype)} "
                f"(app {app.name}): {type(e).__name__}: {e}"
            )
            return MapResult(servfail_from(header, [question]), app, new, used, servfail=True)
        return MapResult(bytes(out), app, new, used)

    def _app(self, questions: list[DNSQuestion]) -> tuple[App, DNSQuestion] | None:
        """The first class-IN question that is an app's, with its app."""
        for q in questions:
            if q.qclass == CLASS_IN and (app := self.config.mapping_app(q.qname.label)):
                return app, q
        return None

    def _answer(
        self,
        app: App,
        question: DNSQuestion,
        answers: list[RR],
        now: float,
        new: list[Assignment],
        used: list[Assignment],
        offered: Mapping[IPAddress, IPAddress],
    ) -> list[RR]:
        qname, qtype = question.qname, question.qtype
        if qtype == TYPE_HTTPS:
            return [
                RR(qname, TYPE_HTTPS, CLASS_IN, _ttl(rr.ttl), _strip_hints(rr.rdata))
                for rr in _chain_records(qname, TYPE_HTTPS, answers)
            ]
        records = []
        addresses = _addresses(qname, qtype, answers)
        # ValueError for a name without text: SERVFAIL, never the real address.
        domain = dnsname.from_labels(qname.label) if addresses else ""
        for real, ttl in addresses:
            assignment, created = self.assignments.reserve(app.name, domain, real, ttl, now,
                                                           offered.get(real))
            used.append(assignment)
            if created:
                new.append(assignment)
            magic = assignment.magic
            if magic.version != real.version:
                raise ValueError(f"magic IP {magic} for {real} is of the other family")
            rdata = A(tuple(magic.packed)) if magic.version == 4 else AAAA(tuple(magic.packed))
            records.append(RR(qname, qtype, CLASS_IN, ttl, rdata))
        return records


def answer_addresses(response: bytes | DNSRecord) -> tuple[str, int, list[tuple[IPAddress, int]]]:
    """(queried name, qtype, [(real address, ttl)]) that a response answers.

    The name is normalised (lower case, trailing dot). Addresses are those
    of the question's type (A or AAAA; any other type gives none) on the
    CNAME chain from the queried name, in answer order, each once, with its
    own record's TTL. A broken chain, a loop or more than MAX_CHAIN hops
    gives none. DNSMapError when the message cannot be read or has other
    than one class-IN question.
    """
    if isinstance(response, DNSRecord):
        questions, answers = response.questions, response.rr
    else:
        try:
            buf, header, questions, complete = _read_head(response)
            if not complete:
                raise DNSMapError("a question cannot be read")
            answers = _parse_records(buf, header.a, _ANSWER_TYPES, "answer")
        except Exception as e:
            raise DNSMapError(f"unreadable DNS message: {e}") from None
    if len(questions) != 1:
        raise DNSMapError(f"DNS message has {len(questions)} questions, expected one")
    q = questions[0]
    if q.qclass != CLASS_IN:
        raise DNSMapError(f"DNS question {q.qname} is of class {q.qclass}, expected IN")
    try:
        domain = dnsname.from_labels(q.qname.label)
    except ValueError as e:
        raise DNSMapError(f"DNS question name: {e}") from None
    return domain, q.qtype, _addresses(q.qname, q.qtype, answers)


def query_question(wire: bytes) -> dnsquery.Question:
    """The only question of the query ``wire``, read as the mapper reads questions.

    Any byte may be in its labels (match it with ``NodeConfig.apps_for_name``
    on ``labels``). DNSMapError when the message cannot be read, is a
    response, or has other than one class-IN question.
    """
    query = dnsquery.parse(wire)  # DNSMapError when not even the header can be read
    if query.qr:
        raise DNSMapError("the message is a response, not a query")
    # Unreadable as for _read_head: a name longer than MAX_NAME too.
    if not query.complete or any(q.size > MAX_NAME for q in query.questions):
        raise DNSMapError("unreadable DNS question")
    if len(query.questions) != 1:
        raise DNSMapError(f"DNS message has {len(query.questions)} questions, expected one")
    if query.questions[0].qclass != CLASS_IN:
        raise DNSMapError(f"DNS question is of class {query.questions[0].qclass}, expected IN")
    return query.questions[0]


def servfail(wire: bytes) -> bytes:
    """A SERVFAIL response to the query (or response) ``wire``, echoing its questions.

    Id, opcode, RD and CD are kept. When the questions cannot be read the
    answer has none. DNSMapError when not even the header can be read.
    """
    try:
        _, header, questions, complete = _read_head(wire)
    except Exception as e:
        raise DNSMapError(f"cannot answer SERVFAIL, unreadable DNS header: {e}") from None
    return servfail_from(header, questions if complete else [])


# -- internals ------------------------------------------------------------------


def _read_head(
    wire: bytes, query: Query | None = None
) -> tuple[DNSBuffer, DNSHeader, list[DNSQuestion], bool]:
    """Header and the questions up to the first that cannot be read; True when all could be.

    The questions are :func:`conn25.core.dnsquery.parse`'s (any byte in a
    label, at most MAX_QUESTIONS), so that the DNS path has one question
    reader; a name longer than MAX_NAME is unreadable here as well, as for
    :meth:`DNSMapper.app_for`. ``query`` is that parse when the caller has it.
    Raises only when the header cannot be read.
    """
    buf = DNSBuffer(wire)
    header = DNSHeader.parse(buf)
    if query is None:
        query = dnsquery.parse(wire)
    questions = []
    for q in query.questions:
        if q.size > MAX_NAME:
            return buf, header, questions, False
        questions.append(DNSQuestion(DNSLabel(q.labels), q.qtype, q.qclass))
    buf.offset = query.end
    return buf, header, questions, query.complete


def _parse_records(buf: DNSBuffer, count: int, wanted: frozenset[int], section: str) -> list[RR]:
    """The next ``count`` records, parsing only the types in ``wanted``."""
    out = []
    for i in range(count):
        rname = buf.decode_name()
        rtype, rclass, ttl, rdlength = buf.unpack("!HHIH")
        end = buf.offset + rdlength
        if end > len(buf.data):
            raise DNSMapError(f"{section} record {i}: RDLENGTH {rdlength} runs past the message")
        if rtype in wanted:
            rr = _record(buf, rname, rtype, rclass, ttl, rdlength)
            if buf.offset != end:
                raise DNSMapError(
                    f"{section} record {i} ({_type_name(rtype)} {rr.rname}): "
                    f"data does not match RDLENGTH {rdlength}"
                )
            out.append(rr)
        buf.offset = end
    return out


def _record(buf: DNSBuffer, rname: DNSLabel, rtype: int, rclass: int, ttl: int,
            rdlength: int) -> RR:
    """What ``RR.parse`` makes of a record whose name and fixed fields were read already
    (its data next in ``buf``), without reading the name a second time. The types asked
    for are never OPT, the one type ``RR.parse`` reads differently."""
    try:
        if not rdlength:
            raise DNSError("Error: Empty RR")
        rdata = RDMAP.get(QTYPE.get(rtype), RD).parse(buf, rdlength)
        return RR(rname, rtype, rclass, ttl, rdata)
    except (BufferError, BimapError) as e:
        raise DNSError(f"Error unpacking RR [offset={buf.offset}]: {e}") from None


def _key(label: DNSLabel) -> tuple[bytes, ...]:
    return dnsname.labels_key(label.label)


def _chain_records(qname: DNSLabel, rtype: int, answers: Iterable[RR]) -> list[RR]:
    """Class-IN records of ``rtype`` owned by a name on the CNAME chain from ``qname``.

    Empty when the chain loops or is longer than MAX_CHAIN hops.
    """
    answers = list(answers)
    cnames: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
    for rr in answers:
        if rr.rtype == TYPE_CNAME and rr.rclass == CLASS_IN:
            cnames.setdefault(_key(rr.rname), _key(rr.rdata.label))
    name = _key(qname)
    chain = {name}
    while name in cnames:
        name = cnames[name]
        if name in chain or len(chain) > MAX_CHAIN:
            return []
        chain.add(name)
    return [rr for rr in answers
            if rr.rtype == rtype and rr.rclass == CLASS_IN and _key(rr.rname) in chain]


def _addresses(qname: DNSLabel, qtype: int, answers: Iterable[RR]) -> list[tuple[IPAddress, int]]:
    if qtype not in (TYPE_A, TYPE_AAAA):
        return []
    out: dict[IPAddress, int] = {}
    for rr in _chain_records(qname, qtype, answers):
        addr = ipaddress.ip_address(bytes(rr.rdata.data))
        out.setdefault(addr, _ttl(rr.ttl))
    return list(out.items())


def _ttl(ttl: int) -> int:
    return ttl if 0 <= ttl <= _MAX_TTL else 0


def _strip_hints(rdata: HTTPS) -> HTTPS:
    """A copy of an HTTPS record without ipv4hint/ipv6hint (also out of "mandatory")."""
    params = []
    for key, value in rdata.params:
        if key in _HINTS:
            continue
        if key == SVC_MANDATORY:
            if len(value) % 2:
                raise DNSMapError("HTTPS record: malformed mandatory SvcParam")
            keys = [k for (k,) in struct.iter_unpack("!H", bytes(value)) if k not in _HINTS]
            if not keys:
                continue  # an empty mandatory list is not allowed (RFC 9460 §8)
            value = b"".join(struct.pack("!H", k) for k in keys)
        params.append((key, value))
    return HTTPS(rdata.priority, rdata.target, params)


def _type_name(rtype: int) -> str:
    return str(QTYPE.get(rtype))
