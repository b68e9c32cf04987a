"""fwd+bwd time of the MoE layer divided by a dense FFN of equal active FLOPs, side by side.

For each granularity the dense FFN and the Expert/Token Choice layers are timed in interleaved
rounds (dense, ec, tc, dense, ec, tc, ...), so slow drifts of a shared machine hit all of them
alike. A ratio is the median over rounds of that round's MoE time / dense time (paired, so a slow
round slows both sides), with its 25th-75th percentile spread; the times are medians over rounds.
The first `warmup` rounds are untimed, and so are up to `settle` more while a round still page-faults:
the allocator's heap grows during the first steps, and first touches of fresh memory are not the
layer's cost in a long training run. At the G=16 shape, a process that starts there faults in
hundreds of huge pages for a few steps (each step then much slower on a VM), where one that ran
the smaller G first has already touched them. Both sides are the modules the model
uses: the dense FFN with its biases, the MoE layer with router and output LayerNorm, both with
their matmuls on the chosen CPU path (`cpu_matmul`, finemoe.kernels.cpu_matmul). Gradients flow into the
input as they do inside a model.

With `breakdown`, a few more steps per layer run with every op timed (finemoe.benchmarks.op_times),
after the timed rounds so they cannot disturb them; the fastest of them is reported.

Beside each ratio stands its matmul floor: the layer's matmul FLOPs (experts and router, forward and
backward) over the dense FFN's, i.e. the ratio if gathers, routing, combines and norms cost nothing.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Callable

import torch

from finemoe.accounting import moe_ffn_matmul_ratio
from finemoe.benchmarks import allocator_settings
from finemoe.benchmarks.op_times import step_breakdown
from finemoe.config import ModelConfig
from finemoe.kernels.cpu_matmul import cpu_matmul as linear_path
from finemoe.nn.model import DenseFFN
from finemoe.nn.moe import MoE


def _minor_faults() -> int:
    """Page faults of this process so far: a step that grows the heap pays for them, a warm one not
    (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Faults per step below this are noise (a stray page); a step that grows the heap takes 100s or more.
SETTLED_FAULTS = 16


def _quartiles(v: list[float]) -> list[float]:
    if len(v) < 2:
        return [v[0], v[0]]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return [q[0], q[2]]


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, sync: Callable[[], None]) -> float:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    sync()
    t0 = time.perf_counter()
    out = layer(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(dy)
    sync()
    return time.perf_counter() - t0


def _counted_step(
    layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, sync: Callable[[], None]
) -> tuple[float, int]:
    """(seconds, page faults) of one fwd+bwd step."""
    f0 = _minor_faults()
    t = _step(layer, x, dy, sync)
    return t, _minor_faults() - f0


def bench_moe_layer(
    granularities=(1, 2, 4, 8, 16),
    d_model: int = 512,
    expansion_rate: int = 16,
    batch: int = 32,
    seq: int = 256,
    repeats: int = 5,
    warmup: int = 2,
    settle: int = 8,
    routings=("ec", "tc"),
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    cpu_matmul: str = "mkl",
    breakdown: bool = False,
    breakdown_steps: int = 3,
) -> dict:
    """Median fwd+bwd milliseconds per layer and the MoE/dense ratios, per granularity."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    autocast = dtype is not None and dtype != torch.float32
    ms: dict[str, dict[str, float]] = {"dense": {}, **{r: {} for r in routings}}
    page_faults: dict[str, dict[str, float]] = {k: {} for k in ms}
    warmup_rounds: dict[str, int] = {}
    ratios: dict[str, dict[str, float]] = {r: {} for r in routings}
    spread: dict[str, dict[str, list[float]]] = {r: {} for r in routings}
    floors: dict[str, dict[str, float]] = {r: {} for r in routings}
    split: dict[str, dict[str, dict[str, float]]] = {k: {} for k in ms}
    base = ModelConfig(d_model=d_model, expansion_rate=expansion_rate, seq_len=seq)
    for G in granularities:
        layers = {"dense": DenseFFN(base.replace(ffn="dense")).to(dev)}
        for r in routings:
            cfg = base.replace(granularity=G, routing=r)
            layers[r] = MoE(cfg).to(dev)
            floors[r][str(G)] = moe_ffn_matmul_ratio(cfg)
        x = torch.randn(batch, seq, d_model, device=dev, requires_grad=True)
        dy = torch.randn(batch, seq, d_model, device=dev)
        times: dict[str, list[float]] = {k: [] for k in layers}
        faults: dict[str, list[int]] = {k: [] for k in layers}
        with (
            torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=autocast),
            linear_path(cpu_matmul),
        ):
            untimed = 0
            while untimed < warmup + settle:
                round_faults = max(_counted_step(layer, x, dy, sync)[1] for layer in layers.values())
                untimed += 1
                if untimed >= warmup and round_faults < SETTLED_FAULTS:
                    break
            warmup_rounds[str(G)] = untimed
            for _ in range(repeats):
                for name, layer in layers.items():
                    t, f = _counted_step(layer, x, dy, sync)
                    times[name].append(t)
                    faults[name].append(f)
            if breakdown:
                for name, layer in layers.items():
                    step = functools.partial(_step, layer, x, dy, sync)
                    runs = [step_breakdown(step, sync) for _ in range(breakdown_steps)]
                    split[name][str(G)] = min(runs, key=lambda b: sum(b.values()))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for k, v in med.items():
            ms[k][str(G)] = v
            page_faults[k][str(G)] = statistics.median(faults[k])
        for r in routings:
            per_round = [t / d for t, d in zip(times[r], times["dense"])]
            ratios[r][str(G)] = statistics.median(per_round)
            spread[r][str(G)] = _quartiles(per_round)
        del layers, x, dy
    out = {
        "ratios": ratios,
        "ratio_p25_p75": spread,
        "matmul_floor": floors,
        "ms": ms,
        "page_faults_per_step": page_faults,
        "shape": {"d_model": d_model, "expansion_rate": expansion_rate, "batch": batch, "seq": seq},
        "repeats": repeats,
        "warmup_rounds": warmup_rounds,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpu_matmul": cpu_matmul,
        "allocator": allocator_settings(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if breakdown:
        out["breakdown_ms"] = split
    return out
