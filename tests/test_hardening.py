"""Failures midway (a full disk, a kill) leave nothing corrupt or stale, and imports refuse bad rows."""

import errno
import os
import sqlite3
import stat

import pytest
from _train_fixtures import make_data, tiny_config

from finemoe.errors import DataError, FinemoeError
from finemoe.io import atomic_path, write_json_atomic


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old checkpoint")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FinemoeError) as e:
        write_json_atomic(target, {"step": 3})
    assert str(e.value) == f"cannot write {target} (No space left on device); it is unchanged"
    assert target.read_bytes() == b"old checkpoint" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_a_full_disk_under_the_store_is_one_line_naming_it(tmp_path, monkeypatch):
    from finemoe.sweep import store as S

    st = S.Store(tmp_path / "s.sqlite")
    real = sqlite3.connect

    class Full:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *a):
            if sql.startswith("UPDATE"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.con.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self.con, name)

    monkeypatch.setattr(S.sqlite3, "connect", lambda *a, **k: Full(real(*a, **k)))
    with pytest.raises(DataError, match=f"cannot write results store {st.path} .*disk is full"):
        st.fail("r1", "x")


def test_a_folder_given_for_a_file_is_named(tmp_path):
    with pytest.raises(FinemoeError, match="is a folder; give a file path"):
        with atomic_path(tmp_path):
            pass


def test_the_weights_file_gets_the_usual_mode(tmp_path):
    from finemoe.config import ModelConfig
    from finemoe.nn.model import Transformer, save_pretrained

    old = os.umask(0o022)
    try:
        save_pretrained(
            Transformer(
                ModelConfig(vocab_size=32, seq_len=8, d_model=16, head_dim=8, n_blocks=1, ffn="dense")
            ),
            tmp_path / "model",
        )
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o644, name


def test_a_kill_during_the_final_save_leaves_no_temp_file_after_resume(tmp_path):
    import torch

    from finemoe.train.config import TrainConfig
    from finemoe.train.trainer import train

    data = make_data(tmp_path / "data")
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=4, threads=1))
    (tmp_path / "run" / "model").mkdir(parents=True)
    stale = tmp_path / "run" / "model" / ".model.safetensors.abc123.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"half")
    (tmp_path / "run" / ".final.json.x.tmp").write_text("{")
    threads = torch.get_num_threads()
    try:
        train(cfg, resume=True, quiet=True)
    finally:
        torch.set_num_threads(threads)
    leftovers = [p.name for p in (tmp_path / "run").rglob(".*.tmp")]
    assert leftovers == [] and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_a_killed_data_prepare_leaves_no_hidden_folder_after_the_next(tmp_path, monkeypatch):
    import json

    from finemoe.data import prepare as P

    out = tmp_path / "corpus"
    stale = tmp_path / ".corpus.k1ll3d.tmp"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 8)
    words = "the quick brown fox jumps over a lazy dog while seven wise owls watch".split()
    lines = [json.dumps({"text": " ".join(words[i:] + words[:i]) + "."}) for i in range(len(words))]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    P.prepare(out, inputs=[tmp_path / "docs.jsonl"], vocab_size=300, val_fraction=0.1, log=None)
    assert not stale.exists() and (out / "train.bin").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_csv_import_refuses_finished_rows_without_a_loss(tmp_path):
    from finemoe.sweep.spec import Run
    from finemoe.sweep.store import Store

    runs = [
        Run(
            f"r{i}",
            f"run {i}",
            {"model": {"ffn": "dense", "d_model": 8, "n_blocks": 1}, "tokens": 10, "seed": 0, "out_dir": "x"},
        )
        for i in range(4)
    ]
    csv = tmp_path / "old.csv"
    csv.write_text(
        "run_id,status,train_loss,tokens,total_params\n"
        "r0,done,3.5,10,100\nr1,done,,10,100\nr2,done,3.1,-10,100\nr3,diverged,,10,100\n"
    )
    st = Store(tmp_path / "s.sqlite")
    st.add(runs, "t")
    n, refused = st.import_finished(csv, [r.run_id for r in runs])
    assert n == 2 and {r["run_id"]: r["status"] for r in st.rows()} == {
        "r0": "done",
        "r1": "pending",
        "r2": "pending",
        "r3": "diverged",
    }
    assert refused == ["r1: status done but train_loss is nan", "r2: status done but tokens is -10"]
