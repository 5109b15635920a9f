"""Reading the tailnet file: the file's name in every error; a missing file is OSError."""

import json

import pytest

from conn25.core.tailnet import TailnetError
from conn25.daemon.tailnetfile import load_file
from nodekeys import with_keys


def test_load_file_names_the_file_in_every_error(tmp_path):
    path = tmp_path / "t.hujson"
    path.write_text(json.dumps(with_keys({"nodes": [{"name": "laptop",
                                                     "addresses": ["100.64.0.1"],
                                                     "endpoint": "nowhere"}]})))
    with pytest.raises(TailnetError) as info:
        load_file(path)
    assert info.value.errors == [f'{path}: nodes[0] ("laptop").endpoint: "nowhere" is not '
                                 '"ip:port" or "[ipv6]:port" ("nowhere" is not an IP address)']


def test_load_file_missing_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "absent.hujson")
