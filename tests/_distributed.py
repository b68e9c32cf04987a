"""Launching `finemoe train` under torchrun (gloo, CPU) and in this process, for the parallel tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _train_fixtures import ROOT, make_data, read_metrics, tiny_config

from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train

STEPS = 20
MODELS = {  # 4 experts; the balance loss, a product of per-rank means, is off where runs are compared
    "tc": {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "tc"},
    "ec": {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "ec", "ec_group_size": 2},
}

needs_distributed = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """`args` (a module as "-m name ..." or a script path) in n torchrun processes on CPU; must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def torchrun_train(n: int, config, *extra: str) -> dict:
    """`finemoe train CONFIG --json [KEY=VALUE ...]` in n processes: rank 0's record."""
    r = torchrun(n, "-m", "finemoe", "train", str(config), "--quiet", "--json", *extra)
    return json.loads(r.stdout.strip().splitlines()[-1])


def train_here(cfg: dict, resume: bool = False) -> dict:
    """The same run in this process (an interpreter start costs more than a tiny run)."""
    threads = torch.get_num_threads()
    try:
        return train(TrainConfig.from_dict(cfg), resume=resume, quiet=True)
    finally:
        torch.set_num_threads(threads)


def parallel_config(tmp_path, name: str, model: str, **over) -> dict:
    """A tiny run of STEPS steps on 8 sequences a step, to compare across process counts and layouts."""
    return tiny_config(
        make_data(tmp_path / "data"),
        tmp_path / name,
        steps=STEPS,
        batch_size=8,
        eval_every=10,
        ckpt_every=10,
        threads=1,
        lb_loss_weight=0.0,
        model=MODELS[model],
        **over,
    )


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]
