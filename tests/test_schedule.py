import math

import pytest
import torch

from finemoe.config import ModelConfig
from finemoe.train.config import TrainConfig
from finemoe.train.schedule import WarmupCosine, lr_at


def paper_lr(step, T):
    """paper.md "Training-schedule checks", written out independently."""
    W = round(0.01 * T)
    if step < W:
        return 2e-4 * (step + 1) / W
    return 2e-5 + 0.5 * 1.8e-4 * (1 + math.cos(math.pi * (step - W) / (T - W)))


def test_paper_run_length_and_schedule():
    # 0.5M tokens per step (2048 x 256); 16B tokens (16.384e9) = 31,250 steps
    cfg = TrainConfig(model=ModelConfig(seq_len=256), batch_size=2048, tokens=16_384_000_000)
    assert cfg.tokens_per_step == 524_288 and cfg.steps == 31_250 and cfg.warmup_steps == 312
    T, W = cfg.steps, cfg.warmup_steps
    for s in [0, 1, 100, W - 1, W, W + 1, 5000, 15_000, T // 2, T - 2, T - 1]:
        assert lr_at(s, cfg.lr, T, W, cfg.final_lr_fraction) == pytest.approx(paper_lr(s, T), rel=1e-12)
    assert lr_at(0, 2e-4, T, W) == pytest.approx(2e-4 / 312)
    assert lr_at(W - 1, 2e-4, T, W) == pytest.approx(2e-4)  # warmup ends at the peak
    assert lr_at(W + (T - W) // 2, 2e-4, T, W) == pytest.approx(1.1e-4, rel=1e-4)  # cosine midpoint
    assert lr_at(T, 2e-4, T, W) == pytest.approx(2e-5)  # ends at 10% of peak


def test_schedule_is_monotone_after_warmup_and_handles_tiny_runs():
    f = WarmupCosine(1000, 10)
    vals = [f(s) for s in range(10, 1001)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert WarmupCosine(1, 0)(0) == 1.0  # one step, no warmup: the peak
    assert WarmupCosine(50, 0)(0) == 1.0 and round(0.01 * 50) == 0


def test_optimizer_sees_the_schedule():
    """The LR actually used at optimizer step s is the schedule at s (LambdaLR off-by-one guard)."""
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(300, 3))
    for s in range(300):
        assert opt.param_groups[0]["lr"] == pytest.approx(paper_lr(s, 300), rel=1e-12)
        opt.step()
        sched.step()
