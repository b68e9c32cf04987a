"""Training-step time of one Transformer block (forward, backward, AdamW) over a grid of widths,
granularities and expansion rates, on the device at hand: the measurements the planner's cost model
(finemoe.scaling.cost_model) is fitted to."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from finemoe.accounting import exact_flops_per_token
from finemoe.config import ModelConfig
from finemoe.nn.model import Block

QUICK = {
    "d_model": [64, 128],
    "granularity": [1, 4, 16, 64],
    "expansion_rate": [4, 8],
    "batch": 8,
    "seq": 128,
}
FULL = {
    "d_model": [128, 256, 512],
    "granularity": [1, 2, 4, 8, 16, 32, 64],
    "expansion_rate": [4, 8, 16],
    "batch": 16,
    "seq": 256,
}


def grid(spec: dict[str, Any], routing: str = "ec") -> list[ModelConfig]:
    """A dense block per width, and an MoE block per (width, E, G) whose experts are at least 2 wide."""
    out = []
    for d in spec["d_model"]:
        base = ModelConfig(d_model=d, n_blocks=1, seq_len=spec["seq"], vocab_size=256, routing=routing)
        out.append(base.replace(ffn="dense"))
        for E in spec["expansion_rate"]:
            for G in spec["granularity"]:
                if base.d_ff % G == 0 and base.d_ff // G >= 2 and spec["batch"] >= E:
                    out.append(base.replace(expansion_rate=E, granularity=G))
    return out


def time_step(cfg: ModelConfig, batch: int, device: str, repeats: int, warmup: int) -> tuple[float, int]:
    """Median seconds of one training step of a single block on `batch` sequences, and its parameters."""
    torch.manual_seed(0)
    block = Block(cfg, cfg.ffn == "moe").to(device)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.seq_len, cfg.d_model, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        y, _ = block(x, None)
        y.square().mean().backward()
        opt.step()

    times = []
    for i in range(warmup + repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(p.numel() for p in block.parameters())


def measure(
    spec: dict[str, Any],
    device: str = "cpu",
    routing: str = "ec",
    repeats: int = 3,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One point per block of the grid: its shape (cost_model.BlockShape fields) and seconds per token."""
    points = []
    tokens = spec["batch"] * spec["seq"]
    for cfg in grid(spec, routing):
        s, params = time_step(cfg, spec["batch"], device, repeats, warmup)
        f = exact_flops_per_token(cfg)
        moe = cfg.ffn == "moe"
        slots = (
            (cfg.capacity_factor * cfg.granularity if routing == "ec" else cfg.k_tokens_choice) if moe else 0
        )
        point = {
            "d_model": cfg.d_model,
            "granularity": cfg.granularity if moe else 0,
            "expansion_rate": cfg.expansion_rate if moe else 1,
            "routing": routing if moe else None,
            "flops_per_token": f["attention_proj"] + f["ffn"] + f["router"] + f["attention_scores"],
            "slots_per_token": float(slots),
            "n_experts": cfg.n_experts if moe else 0,
            "params": params,
            "tokens_per_step": tokens,
            "seconds_per_token": s / tokens,
        }
        points.append(point)
        if progress:
            kind = f"E{cfg.expansion_rate} G{cfg.granularity}" if moe else "dense"
            progress(f"d{cfg.d_model} {kind}: {s * 1e3:.1f} ms/step")
    return points
