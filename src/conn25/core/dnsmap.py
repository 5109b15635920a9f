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

Records are read here, by the rules dnslib reads them with (an owner or CNAME
name's pointers point back, its labels are UTF-8), into light tuples: a fresh
name's answer is read and written once per name on both ends, and dnslib's
objects cost several times more. Only the record types we use are read; the
others are stepped over by their RDLENGTH, which is authoritative (an A record
holds 4 bytes, an AAAA 16). dnslib still reads the data of HTTPS and SOA
records and writes every answer other than addresses.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Mapping
from typing import NamedTuple, cast

import msgspec
from dnslib import CLASS, HTTPS, QTYPE, RR, DNSHeader, DNSRecord
from dnslib.bimap import BimapError
from dnslib.buffer import BufferError
from dnslib.dns import RD, RDMAP, DNSError
from dnslib.label import DNSBuffer, DNSLabel

from . import dnsname, dnsquery
from .assignments import Assignment, Assignments
from .config import App, NodeConfig
from .dnsname import Labels
from .dnsquery import (
    MAX_NAME,
    MAX_POINTERS,
    MAX_QUESTIONS,
    DNSMapError,
    Query,
    Question,
    servfail_to,
)
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
            query = head if head is not None else dnsquery.parse(wire)
        except DNSMapError:
            return MapResult(wire)  # not even a header: not ours
        questions, complete = _readable(query)
        found = self._app(questions)
        if found is None:
            return MapResult(wire)  # no question of an app's that can be read
        app, question = found
        if not complete or len(questions) != 1:
            # An app's question makes it ours, whatever else the message holds. Only that
            # question is echoed: the others may be any bytes, records misread among them.
            self._log(f"dns: SERVFAIL for {question.shown} (app {app.name}): "
                      f"{query.qdcount} questions, {len(questions)} readable")
            return MapResult(servfail_to(query, [question]), app, servfail=True)
        new: list[Assignment] = []
        used: list[Assignment] = []
        try:
            # The head's bytes: the offsets in it are theirs (``wire``, when it came too).
            an, ns = struct.unpack_from("!HH", query.wire, 6)
            records = _Records(query.wire, query.end)
            answers = records.read(an, _ANSWER_TYPES, "answer")
            authority = records.read(ns, _AUTHORITY_TYPES, "authority")
            out = self._answer(app, query, question, answers, authority, now, new, used,
                               offered or {})
        except Exception as e:
            self._log(
                f"dns: SERVFAIL for {question.shown} {_type_name(question.qtype)} "
                f"(app {app.name}): {type(e).__name__}: {e}"
            )
            return MapResult(servfail_to(query, [question]), app, new, used, servfail=True)
        return MapResult(out, app, new, used)

    def _app(self, questions: list[Question]) -> tuple[App, Question] | None:
        """The first class-IN question that is an app's, with its app."""
        for q in questions:
            if q.qclass == CLASS_IN and (app := self.config.mapping_app(q.labels)):
                return app, q
        return None

    def _answer(
        self,
        app: App,
        query: Query,
        question: Question,
        answers: list[_Record],
        authority: list[_Record],
        now: float,
        new: list[Assignment],
        used: list[Assignment],
        offered: Mapping[IPAddress, IPAddress],
    ) -> bytes:
        """The message that goes out for ``question``."""
        qtype = question.qtype
        qkey = dnsname.labels_key(question.labels)
        if qtype == TYPE_HTTPS:
            qname = DNSLabel(question.labels)
            return _pack(query, question, [
                RR(qname, TYPE_HTTPS, CLASS_IN, _ttl(r.ttl), _strip_hints(cast(RR, r.value).rdata))
                for r in _chain_records(qkey, TYPE_HTTPS, answers)
            ], authority)
        addresses = _addresses(qkey, qtype, answers, query.wire)
        if not addresses:
            return _pack(query, question, [], authority)
        # ValueError for a name without text: SERVFAIL, never the real address.
        domain = dnsname.from_labels(question.labels)
        records = []
        for real, ttl in addresses:
            assignment, created = self.assignments.reserve(app.name, domain, real, ttl, now,
                                                           offered.get(real))
            used.append(assignment)
            if created:
                new.append(assignment)
            magic = assignment.magic
            if magic.version != real.version:
                raise ValueError(f"magic IP {magic} for {real} is of the other family")
            records.append((magic, ttl))
        return _pack_addresses(query, question, records)


def answer_addresses(response: bytes | DNSRecord) -> tuple[str, int, list[tuple[IPAddress, int]]]:
    """(queried name, qtype, [(real address, ttl)]) that a response answers.

    The name is normalised (lower case, trailing dot). Addresses are those
    of the question's type (A or AAAA; any other type gives none) on the
    CNAME chain from the queried name, in answer order, each once, with its
    own record's TTL. A broken chain, a loop or more than MAX_CHAIN hops
    gives none. DNSMapError when the message cannot be read or has other
    than one class-IN question.
    """
    wire = bytes(response.pack()) if isinstance(response, DNSRecord) else response
    try:
        query = dnsquery.parse(wire)
        questions, complete = _readable(query)
        if not complete:
            raise DNSMapError("a question cannot be read")
        answers = _Records(wire, query.end).read(struct.unpack_from("!H", wire, 6)[0],
                                                 _ANSWER_TYPES, "answer")
    except Exception as e:
        raise DNSMapError(f"unreadable DNS message: {e}") from None
    if len(questions) != 1:
        raise DNSMapError(f"DNS message has {len(questions)} questions, expected one")
    q = questions[0]
    if q.qclass != CLASS_IN:
        raise DNSMapError(f"DNS question {q.shown} is of class {q.qclass}, expected IN")
    try:
        domain = dnsname.from_labels(q.labels)
    except ValueError as e:
        raise DNSMapError(f"DNS question name: {e}") from None
    return domain, q.qtype, _addresses(dnsname.labels_key(q.labels), q.qtype, answers, wire)


def query_question(wire: bytes) -> dnsquery.Question:
    """The only question of the query ``wire``, read as the mapper reads questions.

    Any byte may be in its labels (match it with ``NodeConfig.apps_for_name``
    on ``labels``). DNSMapError when the message cannot be read, is a
    response, or has other than one class-IN question.
    """
    query = dnsquery.parse(wire)  # DNSMapError when not even the header can be read
    if query.qr:
        raise DNSMapError("the message is a response, not a query")
    # Unreadable as for _readable: a name longer than MAX_NAME too.
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
        query = dnsquery.parse(wire)
    except DNSMapError as e:
        raise DNSMapError(f"cannot answer SERVFAIL, unreadable DNS header: {e}") from None
    questions, complete = _readable(query)
    return servfail_to(query, questions if complete else [])


# -- internals ------------------------------------------------------------------

_AD = 0x0020  # the header's "authentic data" flag
_FIXED = struct.Struct("!HHIH")  # a record's type, class, TTL and RDLENGTH
_ANSWER_HEAD = struct.Struct("!HHHIH")  # a name pointer, then _FIXED


def _readable(query: Query) -> tuple[list[Question], bool]:
    """The questions up to the first that cannot be read; True when all could be.

    Those of :func:`conn25.core.dnsquery.parse` (any byte in a label, at most
    MAX_QUESTIONS), so that the DNS path has one question reader; a name longer
    than MAX_NAME is unreadable here as well, as for :meth:`DNSMapper.app_for`.
    """
    out: list[Question] = []
    for q in query.questions:
        if q.size > MAX_NAME:
            return out, False
        out.append(q)
    return out, query.complete


class _Record(NamedTuple):
    """A record as read: its owner's labels as names compare, its fixed fields, where its
    data is in the message, and what that data says when it was read (a CNAME's target
    as names compare; dnslib's record for HTTPS and SOA; else None)."""

    key: Labels
    rtype: int
    rclass: int
    ttl: int
    start: int
    end: int
    value: object


class _Records:
    """The records of ``wire`` from ``offset`` on, section by section."""

    def __init__(self, wire: bytes, offset: int) -> None:
        self.wire = wire
        self.offset = offset
        self._buf: DNSBuffer | None = None  # for dnslib's readers, made once needed

    def read(self, count: int, wanted: frozenset[int], section: str) -> list[_Record]:
        """The next ``count`` records, those of the types in ``wanted``; every record's
        name and fixed fields are read, so a malformed one of any type is an error."""
        wire = self.wire
        out: list[_Record] = []
        for i in range(count):
            labels, pos = _record_name(wire, self.offset)
            if pos + _FIXED.size > len(wire):
                raise DNSMapError(f"{section} record {i}: runs past the message")
            rtype, rclass, ttl, rdlength = _FIXED.unpack_from(wire, pos)
            start = pos + _FIXED.size
            end = start + rdlength
            if end > len(wire):
                raise DNSMapError(
                    f"{section} record {i}: RDLENGTH {rdlength} runs past the message")
            if rtype in wanted:
                if not rdlength:
                    raise DNSMapError(f"{section} record {i} ({_type_name(rtype)}): no data")
                value = self._data(labels, rtype, rclass, ttl, start, end)
                out.append(_Record(dnsname.labels_key(labels), rtype, rclass, ttl, start, end,
                                   value))
            self.offset = end
        return out

    def _data(self, labels: Labels, rtype: int, rclass: int, ttl: int, start: int,
              end: int) -> object:
        size = _ADDRESS_SIZE.get(rtype)
        if size is not None:
            if end - start != size:
                raise DNSMapError(f"{_type_name(rtype)} record of {end - start} bytes")
            return None
        if rtype == TYPE_CNAME:
            target, after = _record_name(self.wire, start)
            used = after
        else:  # HTTPS, SOA: dnslib's
            if self._buf is None:
                self._buf = DNSBuffer(self.wire)
            self._buf.offset = start
            target = _record(self._buf, DNSLabel(labels), rtype, rclass, ttl, end - start)
            used = self._buf.offset
        if used != end:
            raise DNSMapError(f"{_type_name(rtype)} record {DNSLabel(labels)}: data does not "
                              f"match RDLENGTH {end - start}")
        return dnsname.labels_key(target) if rtype == TYPE_CNAME else target


_ADDRESS_SIZE = {TYPE_A: 4, TYPE_AAAA: 16}


def _record_name(wire: bytes, offset: int) -> tuple[Labels, int]:
    """The labels of the record name at ``offset`` and the offset after it, read as
    dnslib's ``decode_name`` reads one: a pointer points back (a loop is an error,
    as is more than MAX_POINTERS pointers), a length byte below 0xC0 starts a label,
    and a label must be UTF-8. DNSMapError otherwise, and when it runs off the end."""
    labels = []
    end = -1
    hops = 0
    size = len(wire)
    while True:
        if offset >= size:
            raise DNSMapError("name runs past the message")
        length = wire[offset]
        if length >= 0xC0:
            after = offset + 2
            if after > size:
                raise DNSMapError("name runs past the message")
            pointer = (length & 0x3F) << 8 | wire[offset + 1]
            hops += 1
            if pointer >= after or hops > MAX_POINTERS:
                raise DNSMapError(f"bad compression pointer at {offset}")
            if end < 0:
                end = after
            offset = pointer
        elif length:
            stop = offset + 1 + length
            if stop > size:
                raise DNSMapError("name runs past the message")
            label = bytes(wire[offset + 1 : stop])
            try:
                label.decode()
            except UnicodeDecodeError:
                raise DNSMapError(f"label at {offset} is not UTF-8") from None
            labels.append(label)
            offset = stop
        else:
            return tuple(labels), (end if end >= 0 else offset + 1)


def _pack(query: Query, question: Question, records: list[RR],
          authority: list[_Record]) -> bytes:
    """The answer to ``question`` with ``records``, by dnslib; when there are none, with
    the class-IN SOA records of ``authority``."""
    header = DNSHeader(id=query.id, bitmap=query.flags & ~_AD)
    soa = [] if records else [r.value for r in authority if r.rclass == CLASS_IN]
    return bytes(DNSRecord(header, questions=[question.dnslib()], rr=records,
                           auth=soa).pack())


def _pack_addresses(query: Query, question: Question,
                    records: list[tuple[IPAddress, int]]) -> bytes:
    """The answer to ``question``: ``(address, ttl)`` records under its name, written as
    :func:`_pack` writes them (the name once, then a pointer to it in each record)."""
    labels = question.labels
    out = [struct.pack("!6H", query.id, query.flags & ~_AD, 1, len(records), 0, 0),
           *(bytes((len(label),)) + label for label in labels), b"\0",
           struct.pack("!HH", question.qtype, question.qclass)]
    # dnslib points to the question's name (at 12) from a name with labels only.
    owner = 0xC00C if labels else None
    for address, ttl in records:
        data = address.packed
        if owner is None:
            out.append(b"\0" + _FIXED.pack(question.qtype, CLASS_IN, ttl, len(data)))
        else:
            out.append(_ANSWER_HEAD.pack(owner, question.qtype, CLASS_IN, ttl, len(data)))
        out.append(data)
    return b"".join(out)


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


def _chain_records(qkey: Labels, rtype: int, answers: list[_Record]) -> list[_Record]:
    """Class-IN records of ``rtype`` owned by a name on the CNAME chain from ``qkey``.

    Empty when the chain loops or is longer than MAX_CHAIN hops.
    """
    cnames: dict[Labels, Labels] = {}
    for r in answers:
        if r.rtype == TYPE_CNAME and r.rclass == CLASS_IN:
            cnames.setdefault(r.key, r.value)  # type: ignore[arg-type]
    name = qkey
    chain = {name}
    while name in cnames:
        name = cnames[name]
        if name in chain or len(chain) > MAX_CHAIN:
            return []
        chain.add(name)
    return [r for r in answers if r.rtype == rtype and r.rclass == CLASS_IN and r.key in chain]


def _addresses(qkey: Labels, qtype: int, answers: list[_Record],
               wire: bytes) -> list[tuple[IPAddress, int]]:
    if qtype not in (TYPE_A, TYPE_AAAA):
        return []
    out: dict[IPAddress, int] = {}
    for r in _chain_records(qkey, qtype, answers):
        out.setdefault(ipaddress.ip_address(bytes(wire[r.start : r.end])), _ttl(r.ttl))
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
