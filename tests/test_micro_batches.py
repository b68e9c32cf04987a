"""Gradient accumulation: micro-batches under an unchanged global batch follow the same loss curve, and a
run stopped at a step resumes to the end an uninterrupted run reaches."""

import pytest
import torch
from _train_fixtures import make_data, read_metrics, tiny_config

from finemoe.errors import ConfigError
from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train

STEPS = 12
MOE_TC = {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "tc"}
MOE_EC = {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "ec", "ec_group_size": 2}


def _train(cfg: dict, **kw) -> dict:
    threads = torch.get_num_threads()
    try:
        return train(TrainConfig.from_dict(cfg), quiet=True, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model", [{"ffn": "dense"}, MOE_TC, MOE_EC], ids=["dense", "tc", "ec-groups"])
def test_micro_batches_follow_the_whole_batch(tmp_path, model):
    """Token Choice's balance loss is a product of batch means, so it is taken per micro-batch (as per
    rank under DDP) and differs slightly; the LM loss alone must match."""
    data = make_data(tmp_path / "data")
    base = tiny_config(
        data, tmp_path / "whole", steps=STEPS, batch_size=8, threads=1, model=model, lb_loss_weight=0.0
    )
    _train(base)
    _train({**base, "out_dir": str(tmp_path / "micro"), "micro_batch_size": 2})
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "micro")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert a[0]["loss"] - a[-1]["loss"] > 0.3  # the curve moves, so matching it means something


def test_expert_choice_micro_batches_need_fixed_groups(tmp_path):
    data = make_data(tmp_path / "data")
    ec = {**MOE_EC, "ec_group_size": None}
    cfg = tiny_config(data, tmp_path / "run", steps=STEPS, batch_size=8, model=ec, micro_batch_size=4)
    with pytest.raises(ConfigError, match="set model.ec_group_size to a divisor of 4"):
        _train(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work
    with pytest.raises(ConfigError, match="ec_group_size=4 must divide batch_size=8 and micro_batch_size=2"):
        TrainConfig.from_dict({**cfg, "micro_batch_size": 2, "model": {**ec, "ec_group_size": 4}})


def test_stop_at_step_then_resume_equals_one_run(tmp_path):
    data = make_data(tmp_path / "data")
    base = tiny_config(data, tmp_path / "one", steps=STEPS, batch_size=4, threads=1, ckpt_every=5)
    whole = _train(base)
    cut = {**base, "out_dir": str(tmp_path / "cut")}
    stopped = _train({**cut, "stop_at_step": 7})  # not a checkpoint step: the stop writes one
    assert stopped["status"] == "stopped" and stopped["steps"] == 7
    assert not (tmp_path / "cut" / "final.json").exists() and len(read_metrics(tmp_path / "cut")) == 7
    resumed = _train(cut, resume=True)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["val_loss"] == whole["val_loss"]
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [
        r["loss"] for r in read_metrics(tmp_path / "one")
    ]


def test_a_checkpoint_from_before_a_model_field_existed_still_resumes():
    """A model field added since (ec_group_size) counts as its default in an older checkpoint's config."""
    from finemoe.train.trainer import RESUMABLE_CHANGES, config_diff

    cfg = TrainConfig.from_dict({"model": MOE_EC | {"ec_group_size": None}})
    old = cfg.to_dict()
    del old["model"]["ec_group_size"], old["micro_batch_size"]
    assert config_diff(old, cfg, RESUMABLE_CHANGES) == []
    assert config_diff(old, cfg.replace(micro_batch_size=2, batch_size=4), RESUMABLE_CHANGES) == [
        "batch_size",
        "micro_batch_size",
    ]
