"""Expert Choice at inference: thresholds calibrated in training route each sequence on its own."""

import pytest
import torch
from _train_fixtures import make_data, tiny_config

from finemoe.config import ModelConfig
from finemoe.nn.model import Transformer, load_pretrained, save_pretrained
from finemoe.nn.moe import MoE, batch_routing, calibrate
from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train


def _model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=64,
        seq_len=12,
        d_model=32,
        head_dim=16,
        n_blocks=2,
        expansion_rate=2,
        granularity=4,
        **over,
    )
    return Transformer(cfg)


def _trained(model, steps=5, B=8):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(steps):
        x = torch.randint(0, 64, (B, 12), generator=torch.Generator().manual_seed(s))
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def test_training_calibrates_thresholds_as_a_running_mean_of_the_kth_pick():
    model = _model()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert not any(m.calibrated for m in layers)  # NaN until a training batch
    _trained(model, steps=3)
    for m in layers:
        assert m.calibrated and int(m.ec_batches) == 3 and torch.all(m.ec_threshold > 0)


def test_in_eval_a_sequence_does_not_depend_on_its_batch_mates():
    model = _trained(_model()).eval()
    one = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(99))
    mates = [torch.randint(0, 64, (7, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    with torch.no_grad():
        alone = model(one).logits[0]
        for m in mates:
            torch.testing.assert_close(model(torch.cat([one, m])).logits[0], alone, atol=1e-5, rtol=1e-5)
        with batch_routing(model):  # routing as in training: the batch-mates change the answer
            a, b = (model(torch.cat([one, m])).logits[0] for m in mates)
            assert not torch.allclose(a, b, atol=1e-4)


def test_thresholds_survive_save_and_load_and_old_weights_still_load(tmp_path):
    model = _trained(_model()).eval()
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    x = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(("ec_threshold", "ec_batches"))}
    fresh = _model(seed=1)
    fresh.load_state_dict(old)  # written before thresholds existed: loads, uncalibrated
    assert not any(m.calibrated for m in fresh.modules() if isinstance(m, MoE))
    fresh.eval()
    used = calibrate(fresh, [torch.randint(0, 64, (8, 12)) for _ in range(4)])
    assert used == 4 and all(
        m.calibrated and int(m.ec_batches) == 4 for m in fresh.modules() if isinstance(m, MoE)
    )
    assert not fresh.training  # calibrate leaves the mode as it found it


def test_token_choice_models_have_no_thresholds_to_use():
    model = _trained(_model(routing="tc"))
    assert not any(m.calibrated for m in model.modules() if isinstance(m, MoE))


@pytest.mark.parametrize("ffn", ["moe", "dense"])
def test_the_record_has_both_validation_losses_for_expert_choice(tmp_path, ffn):
    data = make_data(tmp_path / "data")
    cfg = TrainConfig.from_dict(
        tiny_config(
            data,
            tmp_path / "run",
            steps=6,
            batch_size=8,
            threads=1,
            model={"ffn": ffn, "expansion_rate": 2, "granularity": 2},
        )
    )
    threads = torch.get_num_threads()
    try:
        record = train(cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    if ffn == "moe":
        assert record["val_loss"] is not None and record["val_loss_independent"] is not None
        assert record["val_loss_independent"] != record["val_loss"]
    else:
        assert "val_loss_independent" not in record


def test_the_report_shows_the_loss_alone_where_runs_recorded_it(tmp_path):
    from pathlib import Path

    import pandas as pd

    from finemoe.report.report import ReportOptions, build_report

    mini = pd.read_csv(Path(__file__).resolve().parents[1] / "experiments" / "mini" / "results.csv")
    plain = build_report_md(build_report, ReportOptions, mini, tmp_path / "a")
    assert "val loss, alone" not in plain
    mini["val_loss_independent"] = mini.val_loss + 0.001
    md = build_report_md(build_report, ReportOptions, mini, tmp_path / "b")
    head = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert head.split(" | ")[8:10] == ["val loss", "val loss, alone"]


def build_report_md(build_report, options, df, folder):
    folder.mkdir()
    df.to_csv(folder / "runs.csv", index=False)
    return build_report(folder / "runs.csv", folder, options(bootstrap=0)).path.read_text()


def test_a_threshold_is_the_mean_over_positions_of_the_kth_pick_then_a_running_mean():
    m = MoE(ModelConfig(d_model=16, expansion_rate=2, granularity=1, seq_len=4))  # 2 experts
    k = 2
    first = torch.tensor([[0.9, 0.5, 0.8, 0.7], [0.6, 0.2, 0.4, 0.3]])  # [n, T*k]: T=2 positions, k=2 picks
    m._calibrate(first, k)
    torch.testing.assert_close(m.ec_threshold, torch.tensor([(0.5 + 0.7) / 2, (0.2 + 0.3) / 2]))
    m._calibrate(first + 0.1, k)  # second batch: the mean of the two
    torch.testing.assert_close(m.ec_threshold, torch.tensor([0.65, 0.30]))
    assert int(m.ec_batches) == 2


def test_calibrating_on_batches_too_small_for_expert_choice_is_refused():
    from finemoe.errors import ConfigError

    with pytest.raises(ConfigError, match="thresholds unset"):
        calibrate(_model(), [torch.randint(0, 64, (1, 12)) for _ in range(2)])
