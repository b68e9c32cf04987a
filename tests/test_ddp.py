"""Two torchrun processes (gloo, CPU) follow the loss curve of one process with the same global batch,
and leave no gloo thread running once training is done."""

import json
import os

import pytest
import torch
from _distributed import needs_distributed, torchrun
from _train_fixtures import ROOT, make_data, read_metrics, tiny_config, write_config

from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train

STEPS = 12


def torchrun_two(*args: str) -> None:
    torchrun(2, *args)


EC_GROUPS = {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "ec", "ec_group_size": 2}


@needs_distributed
@pytest.mark.parametrize("model", [{}, EC_GROUPS], ids=["dense", "ec-groups"])
def test_two_process_ddp_matches_one_process(tmp_path, model):
    """Expert Choice too, in groups of 2 sequences: each rank's 4 hold whole groups."""
    data = make_data(tmp_path / "data")
    base = tiny_config(
        data, tmp_path / "one", steps=STEPS, batch_size=8, eval_every=6, threads=1, model=model
    )
    two = write_config(tmp_path / "two.yaml", {**base, "out_dir": str(tmp_path / "two")})
    torchrun_two("-m", "finemoe", "train", str(two), "--quiet", "--json")

    threads = torch.get_num_threads()
    try:
        one = train(TrainConfig.from_dict(base), quiet=True)
    finally:
        torch.set_num_threads(threads)

    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(a) == len(b) == STEPS
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-5)
    val_a = [(r["step"], r["val_loss"]) for r in a if "val_loss" in r]
    val_b = [(r["step"], r["val_loss"]) for r in b if "val_loss" in r]
    assert [s for s, _ in val_a] == [s for s, _ in val_b] == [6, 12]
    assert [v for _, v in val_b] == pytest.approx([v for _, v in val_a], rel=1e-4, abs=1e-5)
    print("max |loss diff| 1 vs 2 processes:", max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)))
    assert a[0]["loss"] - a[-1]["loss"] > 0.3  # the curve moves, so matching it means something
    rec = json.loads((tmp_path / "two" / "final.json").read_text())
    assert rec["world_size"] == 2 and rec["tokens"] == one["tokens"]


@needs_distributed
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through Linux /proc")
def test_ddp_run_leaves_no_gloo_threads(tmp_path):
    """The process group really goes with teardown: a gloo thread left running can free a
    collective's tensors after the interpreter shut down, and abort a finished run at exit."""
    cfg = tiny_config(
        make_data(tmp_path / "data"), tmp_path / "run", steps=4, batch_size=4, eval_every=2, threads=1
    )
    path = write_config(tmp_path / "run.yaml", cfg)
    torchrun_two(str(ROOT / "tests" / "ddp_teardown_worker.py"), str(path), str(tmp_path))
    reports = [json.loads((tmp_path / f"threads-{rank}.json").read_text()) for rank in (0, 1)]
    for rep in reports:
        assert not [t for t in rep["threads"] if "gloo" in t], rep
