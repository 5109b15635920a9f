"""DNS query reading (sans-IO): a message's head read once, into a value every
step of a query's way takes.

:func:`parse` reads the header and the questions of a message into a
:class:`Query`; the client's answer cache (:mod:`conn25.core.dnscache`), the
mapper (:mod:`conn25.core.dnsmap`) and the forwarder all take that value, so a
client query is parsed once. Questions are read here rather than by dnslib,
which refuses a label that is not UTF-8: DNS allows any byte in a label, and a
name under an app domain is the app's whatever bytes its other labels hold.

Also here: how a DNS server takes what arrives (:func:`screen`) and fits an
answer to a UDP client (:func:`fit_udp`), a SERVFAIL built from a query,
whether a message answers a query (the id and the question echoed, the way a
forwarder tells an answer from a spoofed or stale datagram), and small edits
of a message's header.

May not touch: sockets, clocks, logging, trio.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import NamedTuple

from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from dnslib.label import DNSLabel

__all__ = [
    "MAX_MESSAGE",
    "MAX_POINTERS",
    "MAX_QUESTIONS",
    "UDP_LIMIT",
    "DNSMapError",
    "Query",
    "Question",
    "answers",
    "fit_udp",
    "parse",
    "question_key",
    "read_name",
    "screen",
    "servfail_to",
    "with_id",
    "with_rcode",
]

HEADER = 12
UDP_LIMIT = 512  # what a client that sent no EDNS0 OPT record accepts over UDP
MAX_MESSAGE = 65535  # the TCP length prefix is 16 bits
EDNS_PAYLOAD = 1232  # what a truncated answer advertises (DNS flag day 2020)
MAX_NAME = 255  # octets of a name on the wire (RFC 1035 §2.3.4); stub resolvers refuse longer
MAX_POINTERS = 127  # compression pointers followed in one name; more is a loop
# Questions looked at in one message: reading thousands would cost seconds per message. An
# answer to a query has one, and the client's resolver and the connector insist on that.
MAX_QUESTIONS = 16
_QR = 0x8000
_TC = 0x0200


class DNSMapError(ValueError):
    """A message that cannot be read as a one-question, class-IN DNS message."""


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int, bool]:
    """The labels of the name at ``offset``, the offset after it, and whether it used a
    compression pointer.

    A pointer may point anywhere in the message, as stub resolvers allow (a
    name they can read must not count as unreadable here); a loop ends at
    MAX_POINTERS hops. DNSMapError when the name runs off the end, uses a
    label type other than plain or pointer, or loops.
    """
    labels: list[bytes] = []
    end = -1
    hops = 0
    while True:
        if offset >= len(data):
            raise DNSMapError("name runs past the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 2 > len(data):
                raise DNSMapError("name runs past the message")
            if end < 0:
                end = offset + 2
            hops += 1
            if hops > MAX_POINTERS:
                raise DNSMapError("compression pointers loop")
            offset = struct.unpack_from("!H", data, offset)[0] & 0x3FFF
        elif length & 0xC0:
            raise DNSMapError(f"label type {length >> 6} at {offset}")
        elif length == 0:
            return tuple(labels), (end if end >= 0 else offset + 1), end >= 0
        else:
            if offset + 1 + length > len(data):
                raise DNSMapError("name runs past the message")
            labels.append(bytes(data[offset + 1 : offset + 1 + length]))
            offset += 1 + length


class Question(NamedTuple):
    labels: tuple[bytes, ...]  # as asked (case kept), any bytes
    qtype: int
    qclass: int

    @property
    def size(self) -> int:
        """Octets of the name on the wire, uncompressed (the root label included)."""
        labels = self.labels
        return 1 + len(labels) + sum(map(len, labels))

    @property
    def shown(self) -> str:
        """The name for a message, as dnslib writes it (odd bytes escaped)."""
        return str(DNSLabel(self.labels))

    def dnslib(self) -> DNSQuestion:
        """The question as dnslib's record of it, to write a message with."""
        return DNSQuestion(DNSLabel(self.labels), self.qtype, self.qclass)

    @property
    def folded(self) -> tuple[tuple[bytes, ...], int, int]:
        """The question as an upstream may echo it: names compare ASCII-case-insensitively,
        since upstreams need not keep a 0x20-randomised case."""
        return tuple(label.lower() for label in self.labels), self.qtype, self.qclass


class Query(NamedTuple):
    """The head of one DNS message, read once: id, flags and the questions that could be read.

    ``complete`` is False when a question could not be read (the ones before
    it are in ``questions``) or the message has more than MAX_QUESTIONS.
    ``key`` is the exact bytes of the only question of a plain query (opcode
    QUERY, one question, no answer or authority section, no compression in
    the name), the answer cache's key; None for anything else. ``end`` is the
    offset just past the last question in ``questions``, where the answer
    section starts when ``complete``.
    """

    id: int
    flags: int
    qdcount: int
    questions: tuple[Question, ...]
    complete: bool
    key: bytes | None
    wire: bytes
    end: int

    @property
    def qr(self) -> bool:
        return bool(self.flags & _QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def tc(self) -> bool:
        return bool(self.flags & _TC)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def question(self) -> Question | None:
        """The first question, when one could be read."""
        return self.questions[0] if self.questions else None

    def answered_by(self, response: Query) -> bool:
        """Whether ``response`` answers this query: QR set, same id, opcode and questions."""
        return (
            response.qr
            and response.complete
            and response.id == self.id
            and response.opcode == self.opcode
            and [q.folded for q in response.questions] == [q.folded for q in self.questions]
        )


def parse(wire: bytes) -> Query:
    """The head of ``wire``; DNSMapError only when not even the header can be read."""
    return _parse_recent(wire) if type(wire) is bytes else _parse(wire)


def _parse(wire: bytes) -> Query:
    if len(wire) < HEADER:
        raise DNSMapError(f"unreadable DNS message: {len(wire)} bytes, shorter than a header")
    ident, flags, qd, an, ns = struct.unpack_from("!HHHHH", wire, 0)
    questions: list[Question] = []
    offset = HEADER
    complete = qd <= MAX_QUESTIONS
    compressed = False
    for _ in range(min(qd, MAX_QUESTIONS)):
        try:
            labels, end, pointer = read_name(wire, offset)
        except DNSMapError:
            complete = False
            break
        if end + 4 > len(wire):
            complete = False
            break
        compressed = compressed or pointer
        qtype, qclass = struct.unpack_from("!HH", wire, end)
        questions.append(Question(labels, qtype, qclass))
        offset = end + 4
    plain = not flags & 0xF800 and qd == 1 and not an and not ns
    key = bytes(wire[HEADER:offset]) if plain and complete and not compressed else None
    return Query(ident, flags, qd, tuple(questions), complete, key,
                 wire if type(wire) is bytes else bytes(wire), offset)


# One message is read at several steps of its way (a query: the DNS server's checks, the
# answer cache, the resolver; an answer: the forwarder's check, then the peer API's or the
# mapper's reading): the heads of the last few, by their bytes, are kept (a Query does not
# change).
_parse_recent = functools.lru_cache(maxsize=8)(_parse)


def question_key(wire: bytes) -> bytes | None:
    """:attr:`Query.key` of ``wire``, None also when it is not a DNS message at all."""
    try:
        return parse(wire).key
    except DNSMapError:
        return None


def answers(query: Query, wire: bytes) -> Query | None:
    """The head of ``wire`` when it is a response to ``query``, else None."""
    try:
        head = parse(wire)
    except DNSMapError:
        return None
    return head if query.answered_by(head) else None


def servfail_to(query: Query, questions: Iterable[Question] | None = None) -> bytes:
    """A SERVFAIL response to ``query``, echoing ``questions`` (default: its questions
    when all could be read).

    Id, opcode, RD and CD are kept.
    """
    if questions is None:
        questions = query.questions if query.complete else ()
    return servfail_from(DNSHeader(id=query.id, bitmap=query.flags),
                         [q.dnslib() for q in questions])


def servfail_from(header: DNSHeader, questions: list[DNSQuestion]) -> bytes:
    """A SERVFAIL response to a message with ``header``, echoing ``questions``."""
    out = DNSHeader(
        id=header.id, bitmap=0, qr=1, opcode=header.opcode, rd=header.rd, ra=1, cd=header.cd,
        rcode=RCODE.SERVFAIL,
    )
    try:
        return bytes(DNSRecord(out, questions=list(questions)).pack())
    except Exception:
        # A question that cannot be encoded again: answer without it.
        return bytes(DNSRecord(DNSHeader(id=header.id, bitmap=out.bitmap)).pack())


def with_rcode(wire: bytes, rcode: int) -> bytes:
    """``wire`` with its RCODE replaced."""
    out = bytearray(wire)
    out[3] = (out[3] & 0xF0) | rcode
    return bytes(out)


def with_id(wire: bytes, query: bytes) -> bytes:
    """``wire`` with the id of ``query``."""
    return query[:2] + wire[2:]


Screened = tuple[str, "Query | bytes | None"]


def screen(data: bytes) -> Screened:
    """How a DNS server takes a message that arrived, as (verdict, what to do):

    * ``("query", head)``: a query with one question, to answer (its :func:`parse`);
    * ``("notimp", reply)``: an opcode other than QUERY; ``("formerr", reply)``:
      unreadable, or other than one question; send the reply instead;
    * ``("garbage", None)``: shorter than a header; ``("response", None)``: QR
      set (answering a response could start a loop); drop it.

    Readable means readable by dnslib, as the rest of the way reads it. A plain
    query (one question, no other section, no compression) whose labels are
    UTF-8 is one; anything else is put to dnslib here.
    """
    if len(data) < HEADER:
        return "garbage", None
    flags = struct.unpack_from("!H", data, 2)[0]
    if flags & _QR:
        return "response", None
    head = parse(data)
    if (flags >> 11) & 0xF != 0:
        return "notimp", with_rcode(servfail_to(head), RCODE.NOTIMP)
    readable = _plain(head) or _dnslib_reads(data)
    # A name longer than a name may be is no app's and no one's (the mapper lets its
    # answer pass): forwarded, an odd upstream's answer would carry real addresses under
    # an app's domain. Fail closed, before anything is asked upstream.
    if not readable or any(q.size > MAX_NAME for q in head.questions):
        return "formerr", with_rcode(servfail_to(head), RCODE.FORMERR)
    return "query", head


def _plain(head: Query) -> bool:
    """Whether dnslib reads ``head``'s message as one question without being asked: a
    plain query (see :attr:`Query.key`) with no additional section, its labels UTF-8."""
    if head.key is None or head.wire[10:12] != b"\0\0":
        return False
    try:
        for label in head.questions[0].labels:
            label.decode()
    except UnicodeDecodeError:
        return False
    return True


def _dnslib_reads(data: bytes) -> bool:
    """Whether dnslib reads ``data`` as a message with one question."""
    try:
        return len(DNSRecord.parse(data).questions) == 1
    except Exception:  # dnslib raises several types for a malformed message
        return False


def fit_udp(query: Query, reply: bytes) -> bytes | None:
    """None when a UDP client that asked ``query`` (as :func:`screen` passed it) takes
    ``reply`` (512 bytes, or the payload size of its EDNS0 OPT record); else the
    truncated answer, TC set, to send instead."""
    if len(reply) <= UDP_LIMIT:
        return None
    opt = None
    if query.wire[10:12] != b"\0\0":  # an additional section: dnslib finds the OPT
        opt = next((rr for rr in DNSRecord.parse(query.wire).ar if rr.rtype == QTYPE.OPT),
                   None)
    limit = UDP_LIMIT if opt is None else max(UDP_LIMIT, opt.rclass)
    if len(reply) <= limit:
        return None
    flags = struct.unpack_from("!H", reply, 2)[0] if len(reply) >= 4 else 0x8180
    questions = [q.dnslib() for q in query.questions]
    out = DNSRecord(DNSHeader(id=query.id, bitmap=flags, tc=1), questions=questions)
    if opt is not None:
        out.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return bytes(out.pack())
