import os
import stat

import pytest

from finemoe.errors import FinemoeError
from finemoe.io import atomic_path, ensure_dir, write_json_atomic


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_file_gets_normal_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_ensure_dir_creates_parents(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b").is_dir()
    assert ensure_dir(tmp_path / "a" / "b").is_dir()  # again: nothing to do


@pytest.mark.parametrize(
    "where, msg",
    [
        ("blocker", "run folder .*blocker is a file"),
        ("blocker/sub", "cannot create run folder"),
    ],
)
def test_ensure_dir_says_why_not_in_one_line(tmp_path, where, msg):
    (tmp_path / "blocker").write_text("a file in the way")
    with pytest.raises(FinemoeError, match=msg) as e:
        ensure_dir(tmp_path / where, "run folder")
    assert "\n" not in str(e.value) and "choose another location" in str(e.value)


def test_ensure_dir_probe_catches_what_permission_bits_miss(tmp_path, monkeypatch):
    import tempfile

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    ensure_dir(tmp_path)  # bits say writable
    with pytest.raises(FinemoeError, match=r"cannot write in output folder .*\(Read-only file system\)"):
        ensure_dir(tmp_path, "output folder", probe=True)


def test_atomic_write_under_a_file_is_a_user_error(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(FinemoeError, match="folder .*blocker is a file"):
        write_json_atomic(tmp_path / "blocker" / "a.json", {"x": 1})
    assert (tmp_path / "blocker").read_text() == "x"
