"""DNS wire reading for tests, written apart from the code under test.

dnslib refuses labels that are not UTF-8, which the mapper may echo (a question's labels may
hold any byte), so tests that look at such output read it with these.
"""

from __future__ import annotations

import struct

Labels = tuple[bytes, ...]


def read_name(wire: bytes, i: int) -> tuple[Labels, int]:
    """Labels at ``i`` and the offset after the name, as a stub resolver reads them.

    Pointers may point anywhere in the message (dn_expand allows that); a loop ends after 127
    hops; a name over 255 octets is refused. IndexError/ValueError when the name cannot
    be read.
    """
    labels: list[bytes] = []
    end = None
    hops = 0
    while True:
        n = wire[i]
        if n & 0xC0 == 0xC0:
            end = i + 2 if end is None else end
            hops += 1
            if hops > 127:
                raise ValueError("pointer loop")
            i = struct.unpack_from("!H", wire, i)[0] & 0x3FFF
        elif n & 0xC0:
            raise ValueError("label type")
        elif n == 0:
            return tuple(labels), i + 1 if end is None else end
        else:
            if i + 1 + n > len(wire):
                raise IndexError("label past the end")
            labels.append(wire[i + 1 : i + 1 + n])
            if sum(1 + len(x) for x in labels) + 1 > 255:
                raise ValueError("name too long")
            i += 1 + n


def questions(wire: bytes, limit: int = 16) -> tuple[list[tuple[Labels, int, int]], bool]:
    """(labels, qtype, qclass) of the questions up to the first unreadable; True if all read.

    Questions after the first ``limit`` count as unreadable (the mapper looks at no more).
    """
    out: list[tuple[Labels, int, int]] = []
    if len(wire) < 12:
        return out, False
    i = 12
    count = struct.unpack_from("!H", wire, 4)[0]
    for _ in range(min(count, limit)):
        try:
            labels, i = read_name(wire, i)
            qtype, qclass = struct.unpack_from("!HH", wire, i)
        except (IndexError, ValueError, struct.error):
            return out, False
        out.append((labels, qtype, qclass))
        i += 4
    return out, count <= limit


def address_data(wire: bytes) -> list[bytes]:
    """Every A/AAAA datum and HTTPS address hint (prefixed b"hint ") in any section."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", wire, 4)
    i = 12
    for _ in range(qd):
        i = read_name(wire, i)[1] + 4
    out = []
    for _ in range(an + ns + ar):
        i = read_name(wire, i)[1]
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", wire, i)
        i += 10
        data = wire[i : i + rdlen]
        assert len(data) == rdlen
        if rtype in (1, 28):
            out.append(data)
        elif rtype == 65:  # SvcPriority, TargetName (never compressed), then key/length/value
            j = read_name(data, 2)[1]
            while j + 4 <= len(data):
                key, length = struct.unpack_from("!HH", data, j)
                if key in (4, 6):
                    out.append(b"hint " + data[j + 4 : j + 4 + length])
                j += 4 + length
        i += rdlen
    return out


def frame(wire: bytes) -> bytes:
    """``wire`` with the 2-byte length prefix of DNS over TCP."""
    return len(wire).to_bytes(2, "big") + wire


async def read_frame(stream) -> bytes | None:
    """One length-prefixed message, or None at end of stream.

    Written apart from the module's framer, so that a test does not check the server's
    framing with that same framing.
    """
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
        data = await stream.receive_some(65537)
        if not data:
            return None
        buf += data
    n = int.from_bytes(buf[:2], "big")
    assert len(buf) == 2 + n, "one message at a time in these tests"
    return buf[2:]
