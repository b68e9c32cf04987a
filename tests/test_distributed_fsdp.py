"""FSDP2 on CPU (gloo): 2 torchrun processes follow one process's loss curve, each holds half the
parameters and AdamW states, and a sharded checkpoint resumes at another world size (4 to 2 to 1) where
a continuous run goes."""

import os
import subprocess
import sys

import pytest
import torch
from _distributed import MODELS, STEPS, losses, needs_distributed, parallel_config, torchrun_train, train_here
from _train_fixtures import ROOT, TINY_MODEL, write_config

from finemoe.train.config import TrainConfig

pytestmark = needs_distributed


def config(tmp_path, name: str, model: str, **over) -> dict:
    return parallel_config(tmp_path, name, model, parallel={"fsdp": True}, **over)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_fsdp_two_processes_match_one_and_hold_half_each(tmp_path, model):
    one = train_here(config(tmp_path, "one", model))
    two = torchrun_train(2, write_config(tmp_path / "two.yaml", config(tmp_path, "two", model)))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-5)
    assert a[0] - a[-1] > 0.3  # the curve moves, so matching it means something
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    for key in ("param_bytes_per_rank", "optimizer_bytes_per_rank"):
        print(f"{model} {key}: 1 process {one[key]}, 2 processes {two[key]}")
        # every tensor is cut in two along its first dim; a dim of odd length pads its shard
        assert one[key] / 2 <= two[key] <= one[key] / 2 * 1.05
    # the exported model is whole: the same weights as the one-process run's, up to float rounding
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:  # Expert Choice thresholds too: the ranks' statistics pooled are the whole batch's
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)
    assert any(".ec_threshold" in k for k in w1) == (model == "ec")


def test_sharded_checkpoint_resumes_at_other_world_sizes(tmp_path):
    """4 processes stop at step 7, 2 go on to step 14, one process finishes: the curve is the
    continuous run's, and the model the same."""
    one = train_here(config(tmp_path, "one", "ec"))
    cfg = write_config(tmp_path / "cut.yaml", config(tmp_path, "cut", "ec"))
    four = torchrun_train(4, cfg, "stop_at_step=7")
    assert four["status"] == "stopped"
    assert (tmp_path / "cut" / "ckpt" / ".metadata").is_file()  # a DCP folder, not ckpt.pt
    assert not (tmp_path / "cut" / "ckpt.pt").exists()
    torchrun_train(2, cfg, "--resume", "stop_at_step=14")
    last = train_here(config(tmp_path, "cut", "ec"), resume=True)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "cut")
    assert len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-5)
    assert last["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert last["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)


def test_sharded_checkpoint_refuses_a_different_config(tmp_path):
    cut = config(tmp_path, "cut", "ec", stop_at_step=5)
    train_here(cut)
    r = subprocess.run(
        [sys.executable, "-m", "finemoe", "train", str(write_config(tmp_path / "c.yaml", cut)), "--resume"]
        + ["lr=1e-2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "lr differ" in r.stderr and "Traceback" not in r.stderr


def test_a_sharded_stable_run_snapshots_and_its_branches_load_at_any_world_size(tmp_path):
    """A WSD stable run under FSDP writes its snapshot as a DCP folder; a branch from it, under FSDP or
    in one process, computes what a dedicated one-process WSD run of its length computes."""
    steps_per_token = 8 * TINY_MODEL["seq_len"]  # parallel_config's batch of 8 sequences
    wsd = {"schedule": "wsd", "cooldown_fraction": 0.25, "warmup_tokens": 2 * steps_per_token}
    short = {"tokens": 12 * steps_per_token, **wsd}
    start = TrainConfig.from_dict(config(tmp_path, "x", "ec", **short)).decay_start
    assert start == 9
    stable = config(tmp_path, "stable", "ec", snapshot_steps=[start], **wsd)
    torchrun_train(2, write_config(tmp_path / "stable.yaml", stable))
    snap = tmp_path / "stable" / "snapshots" / f"step_{start}"
    assert (snap / ".metadata").is_file() and not snap.with_suffix(".pt").exists()  # shards, one folder
    init = {"init_from": str(snap.with_suffix(".pt")), **short}  # the path a sweep spec names
    two = torchrun_train(2, write_config(tmp_path / "b2.yaml", config(tmp_path, "b2", "ec", **init)))
    one = train_here(parallel_config(tmp_path, "b1", "ec", **init))
    dedicated = train_here(parallel_config(tmp_path, "ded", "ec", **short))
    assert two["branched_at"] == one["branched_at"] == start and dedicated["branched_at"] == 0
    want = losses(tmp_path / "ded")[start:]
    assert losses(tmp_path / "b2") == pytest.approx(want, rel=1e-5)
    assert losses(tmp_path / "b1") == pytest.approx(want, rel=1e-5)
    assert two["val_loss"] == pytest.approx(dedicated["val_loss"], rel=1e-5)
    assert one["val_loss"] == pytest.approx(dedicated["val_loss"], rel=1e-5)
