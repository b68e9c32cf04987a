"""Time per training token of a Transformer block on one device, as a sum of costs with a reason each.

FLOPs alone miss what fine granularity costs: every expert is a small GEMM with its own fixed cost,
every routed slot is a row gathered and scattered, and AdamW touches all E·G experts' weights each
step whatever the tokens. So the model, per token and block, is

    t = θ_flop·F + θ_slot·S·d + θ_expert·n_e/B + θ_param·P/B + θ_elem·d + θ_step/B

with F the matmul FLOPs per token (forward and backward), S the routed slots per token (capacity
factor·G under Expert Choice, top-k under Token Choice), n_e the experts, P the block's parameters,
d the width and B the tokens per step. The θ are non-negative and fitted to measured steps
(`finemoe bench calibrate`) by least squares on relative error, so small and large blocks weigh alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finemoe.errors import ConfigError

TERMS = ("flop", "slot", "expert", "param", "elem", "step")


@dataclass(frozen=True)
class BlockShape:
    """What the cost model needs to know of a block and its step."""

    d_model: int
    flops_per_token: float  # matmul FLOPs, forward and backward
    slots_per_token: float  # 0 for a dense FFN
    n_experts: int  # 0 for a dense FFN
    params: int
    tokens_per_step: int

    def features(self) -> np.ndarray:
        B = self.tokens_per_step
        return np.array(
            [
                self.flops_per_token,
                self.slots_per_token * self.d_model,
                self.n_experts / B,
                self.params / B,
                self.d_model,
                1.0 / B,
            ]
        )


def fit(shapes: list[BlockShape], seconds_per_token: list[float]) -> dict[str, float]:
    """Non-negative θ minimising the squared relative error of the predicted times."""
    from scipy.optimize import nnls

    X = np.array([s.features() for s in shapes])
    t = np.asarray(seconds_per_token, dtype=float)
    scale = X.max(axis=0)
    scale[scale == 0] = 1.0
    theta, _ = nnls(X / scale / t[:, None], np.ones(len(t)))
    return dict(zip(TERMS, (theta / scale).tolist()))


def predict(theta: dict[str, float], shape: BlockShape) -> float:
    return float(np.dot([theta[k] for k in TERMS], shape.features()))


def holdout_split(n: int, every: int = 4) -> tuple[list[int], list[int]]:
    """Every `every`-th point (from the second) held out, the rest fitted: deterministic, and spread
    over the grid as it was measured."""
    held = list(range(1, n, every))
    return [i for i in range(n) if i not in held], held


def calibrate(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit on most points and report the mean relative error on the held-out ones; then refit on all.

    Each point has the BlockShape fields and `seconds_per_token`."""
    shapes = [BlockShape(**{k: p[k] for k in BlockShape.__dataclass_fields__}) for p in points]
    t = [p["seconds_per_token"] for p in points]
    train, held = holdout_split(len(points))
    theta = fit([shapes[i] for i in train], [t[i] for i in train])
    errors = [abs(predict(theta, shapes[i]) / t[i] - 1) for i in held]
    return {
        "coefficients": fit(shapes, t),
        "holdout_error": float(np.mean(errors)) if errors else None,
        "holdout_max_error": float(np.max(errors)) if errors else None,
        "holdout_points": len(held),
        "fit_points": len(train),
        "model": "s/token/block = flop*F + slot*S*d + expert*n_e/B + param*P/B + elem*d + step/B",
    }


def load_calibration(path: str | Path) -> dict[str, Any]:
    """A `finemoe bench calibrate` file, checked: every cost a non-negative number, at least one positive."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        theta = {k: float(data["coefficients"][k]) for k in TERMS}
    except FileNotFoundError:
        raise ConfigError(
            f"calibration {path} not found; make one with `finemoe bench calibrate --out {path}`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} is not a calibration ({type(e).__name__}); make one with `finemoe bench calibrate`"
        ) from None
    if not all(math.isfinite(v) and v >= 0 for v in theta.values()) or not any(theta.values()):
        raise ConfigError(f"{path}: the costs must be non-negative numbers, not all zero; calibrate again")
    return {**data, "coefficients": theta}
