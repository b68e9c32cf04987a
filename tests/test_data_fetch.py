"""Registry clients: a fresh machine without apt lists gets `apt-get update` once; failures are one line."""

import subprocess

import pytest

from finemoe.data import fetch as F
from finemoe.errors import DataError

PKG = F.Package("debian", "sword-comm-mhcc", "2.0-1", "sword-comm-mhcc_2.0-1_all.deb", None)


def _fake(monkeypatch, replies):
    calls = []

    def run(cmd, what, cwd):
        calls.append(cmd[:2])
        rc, err = replies.pop(0)
        if rc == 0 and cmd[1] == "download":
            (cwd / PKG.filename).write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, rc, "", err)

    monkeypatch.setattr(F, "_run", run)
    return calls


def test_missing_apt_lists_trigger_one_update(tmp_path, monkeypatch):
    monkeypatch.setattr(F.os, "geteuid", lambda: 0)
    calls = _fake(monkeypatch, [(100, "E: Unable to locate package sword-comm-mhcc"), (0, ""), (0, "")])
    assert F.fetch(PKG, tmp_path).read_bytes() == b"deb"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    assert F.fetch(PKG, tmp_path)  # cached now: no further calls
    assert len(calls) == 3


def test_missing_apt_lists_without_root_say_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(F.os, "geteuid", lambda: 1000)
    _fake(monkeypatch, [(100, "W: warning\nE: Unable to locate package sword-comm-mhcc")])
    with pytest.raises(DataError, match="sudo apt-get update"):
        F.fetch(PKG, tmp_path)


def test_client_failure_reports_the_error_line_not_warnings(tmp_path, monkeypatch):
    _fake(
        monkeypatch,
        [(100, "E: Version '2.0-1' for 'sword-comm-mhcc' was not found\nW: Download is unsandboxed")],
    )
    with pytest.raises(DataError, match=r"`apt-get download sword-comm-mhcc=2.0-1` failed: E: Version"):
        F.fetch(PKG, tmp_path)
    assert not list((tmp_path / "debian").iterdir())  # no partial download left in the cache


def test_missing_client_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError()))
    with pytest.raises(DataError, match="`apt-get` not found.*--sources"):
        F.fetch(PKG, tmp_path)
