"""The node's WireGuard private key file: read it, or make it on the first start.

The format is ``wg genkey``'s: the key in base64, then optional whitespace, so a
key made by ``wg genkey`` or ``conn25d genkey`` works here and ours works in wg.

A new file is mode 0600 from the moment it exists (never briefly wider), in
directories made 0700. An existing file that group or others may read or write
is refused, as ssh refuses such a private key: a key others could have read is
no longer secret, and a warning is easily lost in a daemon's log. The way out
is one chmod, which the message names. No message here shows the key.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ..core import tailnet
from ..core.wireguard import keys as wgkeys

# Far more than a key and its newline; a longer file is not a key, and is not read whole.
_MAX_READ = 4096


class KeyFileError(Exception):
    """The key file cannot be read, made or used; the message names the file, never the key."""


def node_key(path: Path, tailnet_path: str, hostname: str) -> tuple[bytes, bool]:
    """This node's private key (made when missing) and whether it was made now, held against
    the tailnet file's entry for the node: KeyFileError, in one line that says which key to
    put where, when the entry holds another public key or none. The entry is read
    leniently: a new node's missing ``publicKey`` makes the file invalid, and this is the
    message that says what to put there. No such node (or an unreadable file) is left to
    the node's own start-up to report."""
    private, created = load_or_create(path)
    public = wgkeys.encode(wgkeys.public_from_private(private))
    try:
        text = Path(tailnet_path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    found = tailnet.find_node(text, hostname)
    if found is not None and found[1] != public:
        made = ", made just now" if created else ""
        raise KeyFileError(f'{found[0]}.publicKey in {tailnet_path} must be "{public}" '
                           f"(the public key of {path}{made})")
    return private, created


def load_or_create(path: Path) -> tuple[bytes, bool]:
    """The private key (32 bytes) in ``path`` and False, or, when there is no such file, a
    new key written there (mode 0600) and True."""
    if (key := _read(path)) is not None:
        return key, False
    try:
        return create(path), True
    except FileExistsError:
        pass
    # Another process made it just now, or something no read finds is in the way.
    if (key := _read(path)) is None:
        raise KeyFileError(f"cannot create the private key {path}: a file is in the way "
                           "(a dangling symbolic link?)")
    return key, False


def read(path: Path) -> bytes:
    """The private key in ``path``, held to the same rules as at start (a regular file, the
    owner's alone); KeyFileError when there is none (nothing is made)."""
    if (key := _read(path)) is None:
        raise KeyFileError(f"there is no private key {path}")
    return key


def _read(path: Path) -> bytes | None:
    """The key in ``path``; None when there is no such file."""
    try:
        # O_NONBLOCK: a FIFO put there must not hang the start (fstat refuses it next).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise KeyFileError(f"cannot read the private key {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # of what was opened, not of what the path names now
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the private key {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"the private key {path} is open to group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), so it may not be secret any more; "
                f"if it is, make it the owner's alone: chmod 600 {path}")
        data = os.read(fd, _MAX_READ)
    except OSError as e:
        raise KeyFileError(f"cannot read the private key {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return wgkeys.decode_file(data)
    except ValueError as e:  # never quotes the text
        raise KeyFileError(f"the private key {path}: {e} (\"conn25d genkey\" or \"wg "
                           "genkey\" makes one)") from None


def create(path: Path, key: bytes | None = None) -> bytes:
    """Write ``key`` (default: a new one) to a new file ``path``, mode 0600, making missing
    directories 0700; the key. FileExistsError when there is a file already."""
    if key is None:
        key = wgkeys.generate_private()
    data = (wgkeys.encode(key) + "\n").encode("ascii")
    try:
        _make_dirs(path.parent)
        # O_EXCL: never an existing file, nor through a symbolic link.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise
    except OSError as e:
        raise KeyFileError(f"cannot create the private key {path}: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # exactly 0600: the umask may have taken the owner's bits
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)  # a crash must not leave an empty key file that refuses the next start
        finally:
            os.close(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise KeyFileError(f"cannot write the private key {path}: {e.strerror}") from None
    return key


def _make_dirs(directory: Path) -> None:
    """``directory`` and its missing parents, each made 0700 (``Path.mkdir(parents=True)``
    would make the parents with the umask's mode)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
