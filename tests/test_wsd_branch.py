"""WSD schedule shape, and cooldown branches that compute exactly what a dedicated run computes."""

import math

import pytest
import torch
from _train_fixtures import make_data, read_metrics, tiny_config

from finemoe.errors import ConfigError
from finemoe.train.config import TrainConfig
from finemoe.train.schedule import WarmupStableDecay
from finemoe.train.trainer import _Run, train


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor(shape):
    f = WarmupStableDecay(total_steps=100, warmup_steps=5, cooldown_steps=20, final_fraction=0.1, shape=shape)
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(f(s) == 1.0 for s in range(5, 80)) and f.decay_start == 80
    decay = [f(s) for s in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.1)
    half = 0.5 if shape == "linear" else 1 - math.sqrt(0.5)  # remaining fraction halfway through the decay
    assert f(89) == pytest.approx(0.1 + 0.9 * half)


def test_wsd_length_sets_only_the_decay():
    """Two WSD runs of different length share every step before the shorter one's decay."""
    short = TrainConfig(tokens=4096 * 100, schedule="wsd", warmup_tokens=4096 * 4, cooldown_fraction=0.2)
    long = short.replace(tokens=4096 * 400)
    a, b = short.lr_multiplier(), long.lr_multiplier()
    assert (
        short.decay_start == 80 and long.decay_start == 320 and short.warmup_steps == long.warmup_steps == 4
    )
    assert all(a(s) == b(s) for s in range(80)) and a(80) < b(80)


def test_wsd_config_is_validated():
    with pytest.raises(ConfigError, match="runs into the cooldown"):
        TrainConfig(tokens=4096 * 10, schedule="wsd", warmup_tokens=4096 * 9, cooldown_fraction=0.5)
    with pytest.raises(ConfigError, match="snapshot_steps"):
        TrainConfig(tokens=4096 * 100, schedule="wsd", snapshot_steps=(90,))
    with pytest.raises(ConfigError, match="schedule must be one of"):
        TrainConfig(schedule="step")


def _train(cfg: dict) -> dict:
    threads = torch.get_num_threads()
    try:
        return train(TrainConfig.from_dict(cfg), quiet=True)
    finally:
        torch.set_num_threads(threads)


def test_a_branch_from_a_stable_snapshot_equals_a_dedicated_run(tmp_path):
    data = make_data(tmp_path / "data")
    wsd = {"schedule": "wsd", "cooldown_fraction": 0.25, "warmup_tokens": 4 * 16 * 3, "threads": 1}
    short = TrainConfig.from_dict(tiny_config(data, tmp_path / "x", steps=40, **wsd))
    assert short.decay_start == 30
    parent = _train(tiny_config(data, tmp_path / "parent", steps=80, snapshot_steps=[30], **wsd))
    snap = tmp_path / "parent" / "snapshots" / "step_30.pt"
    assert parent["status"] == "done" and snap.is_file()

    branch = _train(tiny_config(data, tmp_path / "branch", steps=40, init_from=str(snap), **wsd))
    dedicated = _train(tiny_config(data, tmp_path / "dedicated", steps=40, **wsd))
    assert branch["branched_at"] == 30 and dedicated["branched_at"] == 0
    assert branch["tokens_trained_here"] == 10 * 4 * 16 and branch["tokens"] == dedicated["tokens"]
    assert branch["train_loss"] == dedicated["train_loss"]  # exact: the branch is the same computation
    assert branch["val_loss"] == dedicated["val_loss"]
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "branch")}
    assert min(lrs) == 31 and lrs == {
        r["step"]: r["lr"] for r in read_metrics(tmp_path / "dedicated") if r["step"] > 30
    }


def test_a_branch_resumes_and_a_missing_snapshot_trains_from_step_zero(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    wsd = {"schedule": "wsd", "cooldown_fraction": 0.25, "warmup_tokens": 4 * 16 * 3, "threads": 1}
    _train(tiny_config(data, tmp_path / "parent", steps=80, snapshot_steps=[30], **wsd))
    snap = str(tmp_path / "parent" / "snapshots" / "step_30.pt")
    ref = _train(tiny_config(data, tmp_path / "ref", steps=40, **wsd))

    # the branch dies after its checkpoint at step 35; the resume continues the branch, not step 0
    cfg = tiny_config(data, tmp_path / "b", steps=40, init_from=snap, ckpt_every=5, **wsd)
    step = _Run._step

    def dies_at_37(self, s):
        if s == 36:
            raise KeyboardInterrupt
        return step(self, s)

    monkeypatch.setattr(_Run, "_step", dies_at_37)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg)
    monkeypatch.setattr(_Run, "_step", step)
    threads = torch.get_num_threads()
    try:
        resumed = train(TrainConfig.from_dict(cfg), resume=True, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert resumed["branched_at"] == 30 and resumed["train_loss"] == ref["train_loss"]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(31, 41))

    missing = _train(tiny_config(data, tmp_path / "m", steps=40, init_from=str(tmp_path / "nope.pt"), **wsd))
    assert missing["branched_at"] == 0 and missing["train_loss"] == ref["train_loss"]


def test_a_branch_refuses_a_snapshot_of_another_config(tmp_path):
    data = make_data(tmp_path / "data")
    wsd = {"schedule": "wsd", "cooldown_fraction": 0.25, "warmup_tokens": 4 * 16 * 3, "threads": 1}
    _train(tiny_config(data, tmp_path / "parent", steps=80, snapshot_steps=[30], **wsd))
    snap = str(tmp_path / "parent" / "snapshots" / "step_30.pt")
    with pytest.raises(ConfigError, match="lr differ"):
        _train(tiny_config(data, tmp_path / "b", steps=40, init_from=snap, **{**wsd, "lr": 1e-3}))


def test_init_from_a_foreign_file_or_a_later_step_is_one_line(tmp_path):
    data = make_data(tmp_path / "data")
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match="is not a finemoe snapshot"):
        _train(tiny_config(data, tmp_path / "a", steps=20, init_from=str(foreign), threads=1))
    wsd = {"schedule": "wsd", "cooldown_fraction": 0.25, "warmup_tokens": 4 * 16 * 3, "threads": 1}
    _train(tiny_config(data, tmp_path / "parent", steps=80, snapshot_steps=[50], **wsd))
    with pytest.raises(ConfigError, match="past this run's 40 steps"):
        _train(
            tiny_config(
                data,
                tmp_path / "b",
                steps=40,
                **wsd,
                init_from=str(tmp_path / "parent" / "snapshots" / "step_50.pt"),
            )
        )


def test_a_warmup_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match="longer than the run"):
        TrainConfig(tokens=4096 * 10, warmup_tokens=4096 * 100)
