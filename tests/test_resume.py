"""The test that matters: a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted run
ends."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from _train_fixtures import ROOT, make_data, read_metrics, tiny_config, write_config

from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train

STEPS = 150


def _start(cfg_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "finemoe", "train", str(cfg_path), "--quiet", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _lines(path):
    try:
        return path.read_text().count("\n")
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    data = make_data(tmp_path / "data")
    base = tiny_config(data, tmp_path / "ref", steps=STEPS, ckpt_every=7, eval_every=25, threads=1)
    ref_cfg = write_config(tmp_path / "ref.yaml", base)
    kill_cfg = write_config(tmp_path / "kill.yaml", {**base, "out_dir": str(tmp_path / "kill")})

    kill_at = random.Random().randint(20, STEPS // 2)
    proc = _start(kill_cfg)
    metrics, ckpt = tmp_path / "kill" / "metrics.jsonl", tmp_path / "kill" / "ckpt.pt"
    deadline = time.time() + 120
    while (_lines(metrics) < kill_at or not ckpt.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read()[-500:]}"
    assert not (tmp_path / "kill" / "final.json").exists()
    killed_at = _lines(metrics)

    threads = torch.get_num_threads()
    try:  # resume and reference run in-process: an interpreter start costs more than the runs
        resumed = train(TrainConfig.from_yaml(kill_cfg), resume=True, quiet=True)
        ref = train(TrainConfig.from_yaml(ref_cfg), quiet=True)
    finally:
        torch.set_num_threads(threads)

    assert 0 < killed_at < STEPS, f"kill_at={kill_at} killed_at={killed_at}"
    assert resumed["status"] == ref["status"] == "done" and resumed["steps"] == STEPS
    assert resumed["train_loss"] == ref["train_loss"]  # exact, not approximate
    assert resumed["val_loss"] == ref["val_loss"]
    a, b = read_metrics(tmp_path / "kill"), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))  # no lost or duplicated lines
    assert [(r["loss"], r["lr"], r.get("val_loss")) for r in a] == [
        (r["loss"], r["lr"], r.get("val_loss")) for r in b
    ]


def test_moe_run_interrupted_and_resumed_is_bit_identical(tmp_path, monkeypatch):
    from finemoe.train import trainer

    data = make_data(tmp_path / "data")
    model = {"ffn": "moe", "expansion_rate": 4, "granularity": 2}
    base = tiny_config(data, tmp_path / "ref", steps=24, ckpt_every=5, eval_every=8, model=model)
    ref = train(TrainConfig.from_dict(base), quiet=True)

    cfg = TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "cut")})
    real_step = trainer._Run._step

    def crash_at_13(self, step):
        if step == 13:
            raise KeyboardInterrupt  # a crash mid-run, after the step-10 checkpoint
        return real_step(self, step)

    monkeypatch.setattr(trainer._Run, "_step", crash_at_13)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True)
    monkeypatch.setattr(trainer._Run, "_step", real_step)
    resumed = train(cfg, resume=True, quiet=True)
    assert resumed["train_loss"] == ref["train_loss"] and resumed["val_loss"] == ref["val_loss"]
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [
        r["loss"] for r in read_metrics(tmp_path / "ref")
    ]
