"""``/etc/resolv.conf`` written directly (``--accept-dns`` where no manager owns it).

The original (its bytes, or that it was a symlink and to where, or that there
was none; its mode and owner) goes to a backup file in the state dir *before*
ours is written, so a crash loses nothing: the next start finds the backup and
puts the original back (:meth:`ResolvConf.recover`), and its upstream
resolvers are the original's, never our own file's.

Writes go through a temporary file in the same directory and a rename, so a
reader sees the old file or the new one. A file that is the target of a bind
mount cannot be renamed over (EBUSY): ``ip netns exec`` bind-mounts
``/etc/netns/NAME/resolv.conf`` over ``/etc/resolv.conf``, containers bind
theirs, and a systemd service with ``ProtectSystem=strict`` gets a writable
bind of it in a read-only ``/etc`` (EROFS for the temporary file). Such a file
is written in place (a reader may then see it half written for an instant).

The decisions (whose file it is, what we write, whether a file found at start
is ours) are :mod:`conn25.core.dnsconfig`'s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path

import msgspec

from ..core import dnsconfig
from ..core.dnsconfig import Backup, FileState, Recovery
from .system import SystemSetupError, replace_file

log = logging.getLogger("conn25d.dns")

BACKUP_FILE = "resolv.conf.orig.json"


def read_state(path: str) -> FileState:
    """What is at ``path`` now (a symlink's target read through it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return dnsconfig.MISSING
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    try:
        with open(path, "rb") as f:
            data: bytes | None = f.read()
    except FileNotFoundError:  # a dangling symlink
        data = None
    return FileState(kind="symlink" if link is not None else "file", data=data, link=link,
                     mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)


def _temp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.conn25d-tmp")


def write_file(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
    """``path`` holds ``data`` as a regular file (a symlink there is replaced, not
    followed), with ``mode`` and owner; a bind-mount target is written in place."""
    tmp = _temp_name(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a crash's
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        # A read-only directory around a writable bind mount of the file (a systemd
        # service's ReadWritePaths=/etc/resolv.conf): in place, if it is a file.
        if e.errno != errno.EROFS or not stat.S_ISREG(os.lstat(path).st_mode):
            raise
        _write_in_place(path, data)
        return
    try:
        try:
            os.write(fd, data)
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        _write_in_place(path, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_in_place(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def put_back(path: str, original: FileState) -> None:
    """Make ``path`` what ``original`` describes: the file, the symlink, or nothing."""
    if original.kind == "missing":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif original.kind == "symlink":
        assert original.link is not None
        tmp = _temp_name(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(original.link, tmp)
        try:
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        write_file(path, original.data or b"", original.mode, original.uid, original.gid)


def _fail(what: str, e: OSError) -> SystemSetupError:
    reason = e.strerror or str(e)
    hint = ""
    if e.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        hint = (" (is it immutable, chattr +i, or on a read-only file system, as a "
                "systemd service's /etc is unless ReadWritePaths= names it? "
                "--accept-dns=false leaves it alone)")
    return SystemSetupError(f"{what} failed: {reason}{hint}")


class ResolvConf:
    """Our resolv.conf at ``path`` while the node runs; the original kept in
    ``state_dir``."""

    def __init__(self, path: str, state_dir: str | os.PathLike[str]) -> None:
        self.path = path
        self.state_dir = Path(state_dir)
        self.backup_path = self.state_dir / BACKUP_FILE
        self.active = False

    def _load_backup(self) -> Backup | None:
        try:
            return msgspec.json.decode(self.backup_path.read_bytes(), type=Backup)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as e:
            raise SystemSetupError(
                f"cannot read {self.backup_path} (the original resolv.conf kept by an earlier "
                f"run): {e}; put the original back by hand and remove that file") from None

    def recover(self) -> None:
        """Put back the original that a crashed run left a backup of."""
        backup = self._load_backup()
        if backup is not None:
            log.info("an earlier run did not restore %s: restoring it now", backup.path)
            self._finish(backup)

    def take_over(self, listen: str) -> None:
        """Keep the original, then write ours pointing at ``listen``. On failure
        nothing is changed and SystemSetupError says what failed."""
        try:
            original = read_state(self.path)
        except OSError as e:
            raise _fail(f"reading {self.path}", e) from e
        ours = dnsconfig.our_file(original.data, listen, str(self.state_dir))
        backup = Backup(path=self.path, original=original, written=ours)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            replace_file(self.backup_path, msgspec.json.encode(backup))
        except OSError as e:
            raise _fail(f"keeping the original {self.path} in {self.backup_path}", e) from e
        try:
            write_file(self.path, ours, original.mode if original.kind == "file" else 0o644,
                       original.uid, original.gid)
        except OSError as e:
            self.backup_path.unlink(missing_ok=True)
            raise _fail(f"writing {self.path}", e) from e
        self.active = True
        log.info("DNS: %s points at %s (the original is kept in %s)", self.path, listen,
                 self.backup_path)

    def restore(self) -> None:
        """Put the original back (idempotent)."""
        if not self.active:
            return
        backup = self._load_backup()
        if backup is not None:
            self._finish(backup)
        self.active = False

    def _finish(self, backup: Backup) -> None:
        path = backup.path
        try:
            current = read_state(path)
            if dnsconfig.recovery(current, backup) is Recovery.RESTORE:
                put_back(path, backup.original)
                log.info("DNS: %s restored", path)
            else:
                log.warning("DNS: %s was changed by someone else while conn25d ran; "
                            "leaving it as it is", path)
        except OSError as e:
            raise _fail(f"restoring {path} (the original is kept in {self.backup_path})",
                        e) from e
        self.backup_path.unlink(missing_ok=True)
