"""Atomic writes and hashes: memoe/io.py."""

import os
import stat

import pytest

from memoe.io import atomic_path, file_sha256, write_json


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    """Results, adapters and caches are readable by the other users of a shared machine, as any new file."""
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
        os.umask(0o077)
        write_json(tmp_path / "private.json", {"a": 1})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_atomic_path_leaves_nothing_behind_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
