"""Domain names as conn25 compares them: lower case, fully qualified.

Also the app-domain index (exact names and ``*.`` wildcards) that decides
which app a queried name belongs to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def normalize(name: str) -> str:
    """Lower-case ``name`` and make it fully qualified (trailing dot).

    ValueError when it is not a valid DNS name. A leading ``*`` label is
    allowed (wildcard patterns are names too).
    """
    if not isinstance(name, str):
        raise ValueError(f"{name!r} is not a domain name")
    fqdn = name.strip().lower()
    if not fqdn.endswith("."):
        fqdn += "."
    if fqdn == ".":
        return fqdn
    if len(fqdn) > 254:
        raise ValueError(f"{name!r} is longer than 253 characters")
    labels = fqdn[:-1].split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not _LABEL.match(label):
            raise ValueError(f"{name!r} is not a valid domain name (label {label!r})")
    return fqdn


def is_wildcard(fqdn: str) -> bool:
    return fqdn.startswith("*.")


Labels = tuple[bytes, ...]


def labels_key(labels: Iterable[bytes]) -> Labels:
    """Labels as names compare: ASCII case folded, every other byte as it is (RFC 4343)."""
    try:
        return tuple(map(bytes.lower, labels))  # every query's name comes here: the fast way
    except TypeError:  # labels of another bytes-like type
        return tuple(bytes(label).lower() for label in labels)


def text_labels(name: str) -> Labels:
    """The labels of a name written as text: split at dots, one trailing dot optional.

    No escapes are interpreted and nothing is rejected: a name that
    :func:`normalize` refuses still has labels, and still belongs to the app
    whose domain its last labels are.
    """
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        return ()
    return tuple(part.encode("utf-8", "surrogatepass") for part in text.split("."))


def from_labels(labels: Sequence[bytes]) -> str:
    """The normalised text of a name given as wire labels.

    ValueError when the name has no such text: a label with a byte that
    :func:`normalize` does not accept (a dot inside a label among them, which
    text would read as two labels).
    """
    try:
        fqdn = normalize(b".".join(labels).decode("ascii") + ".")
    except UnicodeDecodeError:
        raise ValueError(f"name {labels!r} has a label with a byte outside ASCII") from None
    if text_labels(fqdn) != labels_key(labels):
        raise ValueError(f"name {labels!r} is not a valid domain name")
    return fqdn


class DomainIndex:
    """Maps a queried name to the apps whose domains match it.

    An exact domain beats a wildcard; otherwise the longest matching
    wildcard wins, and ``*.example.com`` also matches ``example.com``.
    Several apps may share the winning domain; they come out in the order
    they were added, and callers use the first.
    """

    def __init__(self) -> None:
        # Keyed by labels (see labels_key); wildcards by their base, "*.example.com" by
        # (b"example", b"com").
        self._exact: dict[Labels, list[str]] = {}
        self._wild: dict[Labels, list[str]] = {}

    def add(self, fqdn: str, app: str) -> None:
        """Add a normalised domain (see :func:`normalize`) for ``app``."""
        labels = labels_key(text_labels(fqdn))
        if is_wildcard(fqdn):
            apps = self._wild.setdefault(labels[1:], [])
        else:
            apps = self._exact.setdefault(labels, [])
        if app not in apps:
            apps.append(app)

    def lookup(self, name: str | Sequence[bytes]) -> list[str]:
        """Apps for ``name``: text (any case, dot optional) or wire labels; empty when none match.

        Matching is on labels, never on a normalised string: a name whose
        last labels are an app's domain is the app's whatever bytes its other
        labels hold, so that no odd name can slip past the mapping. Wire
        labels are compared as they are: one label "a.b" is not "a" + "b".
        """
        labels = labels_key(text_labels(name) if isinstance(name, str) else name)
        if (apps := self._exact.get(labels)) is not None:
            return list(apps)
        # From the full name towards the root: the first base found is the
        # longest matching wildcard.
        for i in range(len(labels)):
            if (apps := self._wild.get(labels[i:])) is not None:
                return list(apps)
        return []

    def __bool__(self) -> bool:
        return bool(self._exact or self._wild)
