"""A TCP transfer whose bytes are checked, for tests that run it through the datapath.

    tcpblob.py sink HOST PORT          accept one connection, read to EOF, print "N SHA256"
    tcpblob.py source HOST PORT N      accept one connection, send blob(N), close
    tcpblob.py send HOST PORT N        connect, send blob(N), close, print "N SHA256"
    tcpblob.py fetch HOST PORT         connect, read to EOF, print "N SHA256"

blob(N) is the same N pseudo-random bytes everywhere (a fixed seed), so both ends
agree on what should arrive without sending it twice.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys


def blob(n: int) -> bytes:
    return random.Random(25).randbytes(n)


def digest(data: bytes) -> str:
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def read_all(s: socket.socket) -> bytes:
    parts = []
    while chunk := s.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def main() -> None:
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if mode in ("sink", "source"):
        with socket.socket(family, socket.SOCK_STREAM) as ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((host, port))
            ls.listen(1)
            conn, _ = ls.accept()
            with conn:
                if mode == "sink":
                    print(digest(read_all(conn)), flush=True)
                else:
                    conn.sendall(blob(int(sys.argv[4])))
        return
    with socket.create_connection((host, port), timeout=60) as s:
        if mode == "send":
            data = blob(int(sys.argv[4]))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            read_all(s)
            print(digest(data), flush=True)
        else:
            print(digest(read_all(s)), flush=True)


if __name__ == "__main__":
    main()
