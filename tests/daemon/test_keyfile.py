"""The node's private key file: made 0600 on the first start, read as wg writes it,
refused when others may read it; no message shows the key."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from conn25.core.wireguard import keys as wgkeys
from conn25.daemon import keyfile
from conn25.daemon.keyfile import KeyFileError, load_or_create

WG = "wg"  # wireguard-tools, installed by install.sh --dev


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_key(path: Path, data: bytes, file_mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(file_mode)


@pytest.fixture
def umask_0():
    """No umask: what the key file gets is what keyfile asks for, nothing taken away."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_missing_key_is_made_0600_in_new_0700_directories(tmp_path, umask_0):
    path = tmp_path / "a" / "b" / "private.key"
    key, created = load_or_create(path)
    assert created and len(key) == 32
    assert path.read_text() == wgkeys.encode(key) + "\n"  # wg genkey's format
    assert mode(path) == 0o600
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700


def test_the_key_file_is_never_wider_than_0600_not_even_at_creation(tmp_path, monkeypatch):
    calls = []
    real_open = os.open

    def spy(path, flags, file_mode=0o777, *args, **kwargs):
        calls.append((flags, file_mode))
        return real_open(path, flags, file_mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    load_or_create(tmp_path / "private.key")
    creating = [(f, m) for f, m in calls if f & os.O_CREAT]
    assert len(creating) == 1
    flags, file_mode = creating[0]
    assert flags & os.O_EXCL and file_mode == 0o600


def test_an_existing_key_is_read_not_replaced(tmp_path):
    path = tmp_path / "private.key"
    key, _ = load_or_create(path)
    assert load_or_create(path) == (key, False)
    assert path.read_text() == wgkeys.encode(key) + "\n"


@pytest.mark.parametrize("tail", [b"", b"\n", b"\r\n", b"  \n\n"])
def test_a_key_with_trailing_whitespace_is_read(tmp_path, tail):
    key = wgkeys.generate_private()
    path = tmp_path / "private.key"
    write_key(path, wgkeys.encode(key).encode() + tail)
    assert load_or_create(path) == (key, False)


def test_a_key_from_wg_genkey_is_read_and_ours_works_in_wg_pubkey(tmp_path):
    theirs = tmp_path / "wg.key"
    write_key(theirs, subprocess.run([WG, "genkey"], capture_output=True, check=True).stdout)
    key, created = load_or_create(theirs)
    public = subprocess.run([WG, "pubkey"], input=theirs.read_bytes(), capture_output=True,
                            check=True).stdout.decode().strip()
    assert not created and wgkeys.encode(wgkeys.public_from_private(key)) == public

    ours = tmp_path / "ours.key"
    key, created = load_or_create(ours)
    public = subprocess.run([WG, "pubkey"], input=ours.read_bytes(), capture_output=True,
                            check=True).stdout.decode().strip()
    assert created and public == wgkeys.encode(wgkeys.public_from_private(key))


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_key_open_to_group_or_others_is_refused_with_the_fix(tmp_path, file_mode):
    """Like ssh with a private key: refused, not used with a warning."""
    key = wgkeys.encode(wgkeys.generate_private())
    path = tmp_path / "private.key"
    write_key(path, key.encode() + b"\n", file_mode)
    with pytest.raises(KeyFileError) as info:
        load_or_create(path)
    message = str(info.value)
    assert f"the private key {path} is open to group or others (mode {file_mode:04o})" in message
    assert f"chmod 600 {path}" in message
    assert key[:8] not in message
    assert mode(path) == file_mode  # left as it was: the operator decides


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "0 characters"),
    (b"this is not a key\n", "17 characters"),
    (b"\xff" * 44, "not base64 text"),
])
def test_a_malformed_key_file_is_an_error_naming_the_file_not_its_text(tmp_path, data, reason):
    path = tmp_path / "private.key"
    write_key(path, data)
    with pytest.raises(KeyFileError) as info:
        load_or_create(path)
    message = str(info.value)
    assert message.startswith(f"the private key {path}: not a WireGuard key")
    assert reason in message and "genkey" in message
    assert "this is" not in message and "\\xff" not in message


def test_a_private_key_text_that_is_almost_right_is_not_shown(tmp_path):
    text = wgkeys.encode(wgkeys.generate_private())
    path = tmp_path / "private.key"
    write_key(path, text[:-2].encode() + b"==\n")
    with pytest.raises(KeyFileError) as info:
        load_or_create(path)
    assert text[:8] not in str(info.value)


def test_a_directory_or_fifo_in_place_of_the_key_is_refused(tmp_path):
    (tmp_path / "dir.key").mkdir()
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    for name in ("dir.key", "fifo.key"):
        with pytest.raises(KeyFileError, match="is not a regular file"):
            load_or_create(tmp_path / name)


def test_a_key_that_cannot_be_read_or_made_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "private.key"
    with pytest.raises(KeyFileError) as info:
        load_or_create(path)
    assert str(info.value) == f"cannot read the private key {path}: Not a directory"
    with pytest.raises(KeyFileError) as info:
        keyfile.create(path)
    assert str(info.value) == f"cannot create the private key {path}: Not a directory"


def test_a_dangling_symlink_in_the_way_is_an_error_and_nothing_is_made(tmp_path):
    path = tmp_path / "private.key"
    path.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match="a file is in the way"):
        load_or_create(path)
    assert not (tmp_path / "elsewhere.key").exists()


def test_create_writes_a_given_key_and_never_overwrites(tmp_path):
    key = wgkeys.generate_private()
    path = tmp_path / "private.key"
    assert keyfile.create(path, key) == key
    assert load_or_create(path) == (key, False)
    with pytest.raises(FileExistsError):
        keyfile.create(path)
    assert load_or_create(path) == (key, False)


def test_read_takes_an_existing_key_and_never_makes_one(tmp_path):
    """keyfile.read (what conn25.lab.wgmember uses): the key in the file, held to the
    rules of the start; no file is an error, and nothing is made in its place."""
    path = tmp_path / "private.key"
    with pytest.raises(KeyFileError, match="there is no private key"):
        keyfile.read(path)
    assert not path.exists()
    key = keyfile.create(path)
    assert keyfile.read(path) == key
    path.chmod(0o640)
    with pytest.raises(KeyFileError) as info:
        keyfile.read(path)
    assert wgkeys.encode(key)[:8] not in str(info.value)
