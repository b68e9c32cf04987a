import json
import math

import pytest
import torch
from _train_fixtures import TINY_MODEL, make_data, read_metrics, tiny_config

from finemoe.errors import ConfigError, DataError
from finemoe.nn.model import Transformer, load_pretrained
from finemoe.train import trainer
from finemoe.train.config import TrainConfig
from finemoe.train.metrics import imbalance
from finemoe.train.trainer import param_groups, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_tiny_run_writes_metrics_checkpoint_and_final_record(data, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=30))
    rec = train(cfg, quiet=True)
    out = tmp_path / "run"
    assert rec == json.loads((out / "final.json").read_text())
    assert rec["status"] == "done" and rec["steps"] == 30 and rec["tokens"] == 30 * 4 * 16
    assert rec["total_params"] == rec["active_params"] == 12 * 32**2 * 2
    assert rec["flops"] == pytest.approx(6 * rec["active_params"] * rec["tokens"])  # dense: F = 6 N D
    assert rec["ffn"] == "dense" and rec["granularity"] == 0 and rec["expansion_rate"] == 1
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5  # it learns the counter
    assert rec["train_loss"] == pytest.approx(sum(losses[-3:]) / 3)  # window = 10% of 30 steps
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    assert rec["val_loss"] == rows[-1]["val_loss"] and math.isfinite(rec["val_loss"])
    assert cfg.warmup_steps == 0 and rows[0]["lr"] == cfg.lr  # round(1% of 30) = 0: no warmup
    assert rows[-1]["lr"] < rows[0]["lr"] and rows[-1]["lr"] > 0.1 * cfg.lr
    assert all(r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 for r in rows)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 30 and set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert len(ckpt["losses"]) == cfg.window
    model = load_pretrained(out / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_existing_run_needs_resume_and_a_finished_run_returns_its_record(data, tmp_path):
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=10))
    rec = train(cfg, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, quiet=True)
    assert train(cfg, resume=True, quiet=True) == rec
    with pytest.raises(ConfigError, match="different config"):
        (tmp_path / "run" / "final.json").unlink()
        train(cfg.replace(lr=1e-3), resume=True, quiet=True)


def test_data_errors(data, tmp_path):
    with pytest.raises(DataError, match="not found"):
        train(TrainConfig.from_dict(tiny_config(tmp_path / "nodata", tmp_path / "r")), quiet=True)
    small = tiny_config(data, tmp_path / "r", model={"vocab_size": 32})
    with pytest.raises(DataError, match="model.vocab_size"):
        train(TrainConfig.from_dict(small), quiet=True)


def test_weight_decay_only_on_matrices():
    model = Transformer(TrainConfig.from_dict({"model": TINY_MODEL}).model)
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert (
        "head.weight" in names and "blocks.0.attn.qkv.weight" in names and "blocks.0.ffn.fc1.weight" in names
    )
    assert not any("emb" in n or "ln" in n or n.endswith("bias") for n in names)
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


class _Diverging(Transformer):
    """Loss turns NaN at the 5th forward: the trainer must stop cleanly and record it."""

    calls = 0

    def forward(self, idx, targets=None):
        out = super().forward(idx, targets)
        type(self).calls += 1
        if type(self).calls >= 5 and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out


def test_divergence_is_recorded_not_raised(data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "Transformer", _Diverging)
    _Diverging.calls = 0
    rec = train(
        TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=20, eval_every=100)), quiet=True
    )
    assert rec["status"] == "diverged" and rec["steps"] == 4 and rec["train_loss"] is None
    assert json.loads((tmp_path / "run" / "final.json").read_text())["status"] == "diverged"
    assert read_metrics(tmp_path / "run")[-1] == {"step": 5, "status": "diverged"}


class _FakeMoE(Transformer):
    """Reports the MoE aux terms of the FFN contract, so their handling is tested without the MoE layer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.router = torch.nn.Parameter(torch.zeros(4))

    def forward(self, idx, targets=None):
        out = super().forward(idx, targets)
        p = torch.softmax(self.router, 0)
        load = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125]])
        out.aux = {"lb_loss": 4 * (p * p).sum(), "z_loss": self.router.square().sum() + 1.0, "load": load}
        return out


def test_moe_aux_losses_and_imbalance_are_used_and_logged(data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "Transformer", _FakeMoE)
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=3, lb_loss_weight=0.5))
    train(cfg, quiet=True)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["lb_loss"] == pytest.approx(1.0) and rows[0]["z_loss"] == pytest.approx(1.0)
    assert rows[0]["imbalance"] == pytest.approx(2.0)  # worst layer: max 0.5 / mean 0.25
    assert imbalance(torch.full((3, 8), 1 / 8)) == pytest.approx(1.0)


def test_moe_run_end_to_end(data, tmp_path):
    model = {"ffn": "moe", "expansion_rate": 4, "granularity": 2}
    rec = train(TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=10, model=model)), quiet=True)
    assert rec["status"] == "done" and rec["granularity"] == 2 and rec["total_params"] > rec["active_params"]
    assert all("imbalance" in r for r in read_metrics(tmp_path / "run"))


def test_progress_bar_on_a_terminal_only(data, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(TrainConfig.from_dict(tiny_config(data, tmp_path / "a", steps=5)))
    err = capsys.readouterr().err
    assert "5/5" in err and "tok_s" in err and "loss" in err
    train(TrainConfig.from_dict(tiny_config(data, tmp_path / "b", steps=5)), quiet=True)
    assert capsys.readouterr().err == ""
