"""Planning under wall-clock time: the best (N, D, G) when a token costs what the device measured, not
what the FLOPs model charges.

The law is the same Eq. 9; only the budget changes. For a time budget T (seconds on one device, or
device-seconds) and a shape (d_model, G), the tokens are D = T / t(d, G), where t is the calibrated
seconds per token (finemoe.scaling.cost_model, fitted by `finemoe bench calibrate`) times the blocks.
Fine granularity lowers the law's loss but raises t (small GEMMs, routed slots, E·G experts), so the
time-optimal G can sit below the FLOPs-optimal one. Embedding and head are left out, as in the FLOPs
model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scipy.optimize import brentq, minimize_scalar

from finemoe import accounting as acc
from finemoe.errors import ConfigError
from finemoe.scaling.cost_model import BlockShape, predict
from finemoe.scaling.laws import MoELaw
from finemoe.scaling.plan import LOG_D_BOUNDS, Settings, optimum

SEQ_LEN = 2048  # for attention's score FLOPs, which the cost model sees
TOKENS_PER_STEP = 2**19  # the paper's 0.5M-token batches: per-step costs nearly vanish per token


@dataclass(frozen=True)
class TimePlan:
    granularity: float
    d_model: float
    n_blocks: float
    total_params: float
    active_params: float
    tokens: float
    seconds: float
    seconds_per_token: float
    flops_model_seconds_per_token: float  # what the FLOPs model would charge, at the dense calibration
    loss: float


def block_shape(
    d: float, E: float, G: float, seq_len: int | None = None, tokens: int | None = None
) -> BlockShape:
    """One MoE block (G > 0; G = 0 for dense) as the cost model sees it, at capacity factor 1."""
    seq_len = SEQ_LEN if seq_len is None else seq_len
    tokens = TOKENS_PER_STEP if tokens is None else tokens
    ffn = 3 * 2 * 2 * d * 4 * d
    router = 3 * 2 * d * E * G if G else 0.0
    experts = 8 * E * d * d if G else 8 * d * d
    return BlockShape(
        d_model=int(round(d)),
        flops_per_token=3 * 2 * 4 * d * d + ffn + router + 3 * 2 * 2 * seq_len * d,
        slots_per_token=float(G),
        n_experts=int(round(E * G)),
        params=int(4 * d * d + experts + (d * E * G if G else 0)),
        tokens_per_step=tokens,
    )


def seconds_per_token(theta: dict[str, float], d: float, E: float, G: float, aspect: float) -> float:
    return acc.n_blocks_for(d, aspect) * predict(theta, block_shape(d, E, G))


def _flop_rate(theta: dict[str, float], d: float) -> float:
    """Seconds per matmul FLOP of a dense block of width d: the FLOPs model's exchange rate."""
    shape = block_shape(d, 1, 0)
    return predict(theta, shape) / shape.flops_per_token


def _point(law: MoELaw, theta, seconds: float, G: float, log_d: float, s: Settings) -> TimePlan:
    d = math.exp(log_d)
    n = acc.n_blocks_for(d, s.aspect)
    t = seconds_per_token(theta, d, s.expansion_rate, G, s.aspect)
    D = seconds / t
    N = acc.total_params(d, n, s.expansion_rate)
    flops_t = acc.flops_per_token(d, n, s.expansion_rate, G, s.c_f, s.c_r) * _flop_rate(theta, d)
    return TimePlan(G, d, n, N, acc.active_params(d, n), D, seconds, t, flops_t, float(law.loss(N, D, G)))


def time_optimum_for_g(law: MoELaw, theta, seconds: float, G: float, s: Settings) -> TimePlan:
    f = lambda x: _point(law, theta, seconds, G, x, s).loss  # noqa: E731
    r = minimize_scalar(f, bounds=(LOG_D_BOUNDS[0], s.log_d_max()), method="bounded", options={"xatol": 1e-9})
    return _point(law, theta, seconds, G, float(r.x), s)


def time_optimum(law: MoELaw, theta, seconds: float, s: Settings) -> TimePlan:
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"the time budget must be a positive number of seconds, got {seconds}")
    return min((time_optimum_for_g(law, theta, seconds, G, s) for G in s.granularities), key=lambda p: p.loss)


def seconds_to_reach(law: MoELaw, theta, loss: float, s: Settings, start: float) -> float:
    """The least time whose time-optimal plan reaches `loss` (the loss falls as time grows)."""
    f = lambda x: time_optimum(law, theta, math.exp(x), s).loss - loss  # noqa: E731
    lo, hi = math.log(start) - 20, math.log(start) + 5
    if f(hi) > 0 or f(lo) < 0:
        return math.nan
    return math.exp(brentq(f, lo, hi, xtol=1e-6))


def compare(
    law: MoELaw, theta, s: Settings, flops: float | None = None, seconds: float | None = None
) -> dict[str, Any]:
    """The time-optimal plan beside the FLOPs-optimal one, for the same wall-clock.

    With `flops`, the wall-clock is what the FLOPs-optimal plan takes on the calibrated device; with
    `seconds` it is given, and the FLOPs-optimal plan is the one whose run takes that long."""
    if (flops is None) == (seconds is None):
        raise ConfigError("give a FLOPs budget or a time budget")
    if flops is not None:
        f_plan = optimum(law, flops, s)
        seconds = _run_seconds(f_plan, theta, s)
    else:
        g = lambda x: _flops_plan_seconds(law, theta, math.exp(x), s) - seconds  # noqa: E731
        f_plan = optimum(law, math.exp(brentq(g, math.log(1e6), math.log(1e40), xtol=1e-9)), s)
    t_plan = time_optimum(law, theta, seconds, s)
    f_time = _point(law, theta, seconds, f_plan.granularity, math.log(f_plan.d_model), s)
    reach = seconds_to_reach(law, theta, f_plan.loss, s, seconds)
    return {
        "seconds": seconds,
        "granularity": t_plan.granularity,
        "flops_optimal_granularity": f_plan.granularity,
        "time_optimal": t_plan.__dict__,
        "flops_optimal": {**f_time.__dict__, "tokens": f_plan.tokens, "loss": f_plan.loss},
        "time_saving": seconds / reach if reach == reach else None,
        "why": _why(theta, s, t_plan, f_plan.granularity, f_plan.d_model),
    }


def calibration_summary(cal: dict[str, Any], path: str, d_model: float) -> dict[str, Any]:
    """Where a calibration comes from, how well it predicts held-out blocks, and how far a plan of
    width d_model lies beyond the widest block it measured."""
    widths = [p["d_model"] for p in cal.get("points", []) if isinstance(p, dict) and "d_model" in p]
    return {
        "file": path,
        "device": cal.get("device"),
        "holdout_error": cal.get("holdout_error"),
        "largest_width_measured": max(widths) if widths else None,
        "width_extrapolation": d_model / max(widths) if widths else None,
    }


def _flops_plan_seconds(law, theta, flops, s) -> float:
    return _run_seconds(optimum(law, flops, s), theta, s)


def _run_seconds(p, theta, s: Settings) -> float:
    """How long a plan's training run takes on the calibrated device."""
    return p.tokens * seconds_per_token(theta, p.d_model, s.expansion_rate, p.granularity, s.aspect)


def _why(theta, s: Settings, t_plan: TimePlan, g_flops: float, d: float) -> str:
    """Measured cost of the FLOPs-optimal G over the FLOPs model's, at its width: the reason they differ."""
    measured = seconds_per_token(theta, d, s.expansion_rate, g_flops, s.aspect)
    dense = seconds_per_token(theta, d, 1, 0, s.aspect)
    model = acc.flops_per_token(d, 1, s.expansion_rate, g_flops, s.c_f, s.c_r) / acc.flops_per_token(d, 1)
    text = (
        f"at d_model {d:.0f}, G={g_flops:g} costs {measured / dense:.2f}x a dense token on the calibrated "
        f"device, where the FLOPs model charges {model:.2f}x"
    )
    if t_plan.granularity != g_flops:
        text += f"; so the time-optimal G is {t_plan.granularity:g}"
    return text
