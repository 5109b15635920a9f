"""The one exception a refused datagram raises."""

from __future__ import annotations


class Rejected(ValueError):
    """A datagram refused: malformed, failed authentication, replayed, too old or unwanted.
    The message says why and never holds key material."""
