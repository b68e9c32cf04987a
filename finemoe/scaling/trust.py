"""Can a fitted law be trusted, and how far is a plan from the runs behind it? (no torch)

A law fitted on a user's own small runs is only as good as those runs: three checks say when it is not.
- Degenerate fits: coefficients that do not describe a law, only a curve through the points.
- Extrapolation: a plan's budget, model size and tokens against the largest of the fitted runs.
- Uncertainty: the plan recomputed under every bootstrap draw of the coefficients (`fit --out` stores
  them), read as p10/p50/p90.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

# A fit is flagged degenerate when any of these holds; each rule is written out in `fit_flags`.
EXPONENT_RANGE = (0.01, 2.0)  # alpha, beta, gamma outside: a power law that is flat or a cliff
COEFFICIENT_MAX = 1e6  # a, b, g above: a coefficient ran off trading against its exponent
C_FLOOR_EXPONENT = 0.1  # c at 0 (below 1% of the lowest loss) with alpha or beta below this
BOOTSTRAP_SPAN = 100.0  # p90 / p10 of a free coefficient above: the runs do not pin it down
EXPONENTS = ("alpha", "beta", "gamma")
WARN_FACTOR = 100.0  # a plan this far past the largest training run's FLOPs warns loudly
QUANTILES = (10, 50, 90)


def fit_flags(
    params: dict[str, float],
    fixed: Sequence[str] = (),
    bootstrap: dict[str, Any] | None = None,
    min_loss: float | None = None,
) -> list[str]:
    """Why a fit cannot be read as a law, one reason per entry; empty when none applies."""
    free = {k: v for k, v in params.items() if k not in fixed}
    lo, hi = EXPONENT_RANGE
    out = [
        f"exponent {k}={v:.3g} is outside [{lo:g}, {hi:g}]"
        for k, v in free.items()
        if k in EXPONENTS and not lo <= v <= hi
    ]
    out += [
        f"coefficient {k}={v:.3g} is above {COEFFICIENT_MAX:.0e}"
        for k, v in free.items()
        if k in ("a", "b", "g") and v > COEFFICIENT_MAX
    ]
    if "c" in free and min_loss is not None and free["c"] < 0.01 * min_loss:
        low = [f"{k}={free[k]:.3g}" for k in ("alpha", "beta") if k in free and free[k] < C_FLOOR_EXPONENT]
        if low:
            out.append(
                f"c={free['c']:.2g} sits at 0 with {', '.join(low)} below {C_FLOOR_EXPONENT:g}: the fit "
                "trades "
                "the irreducible loss for a flat power law"
            )
    draws = (bootstrap or {}).get("draws") or []
    for k in free:
        vals = np.array([d[k] for d in draws if k in d], float)
        if len(vals) >= 5:
            p10, p90 = np.percentile(vals, [10, 90])
            if p10 <= 0 or p90 / p10 > BOOTSTRAP_SPAN:
                out.append(f"bootstrap p10-p90 of {k} spans [{p10:.3g}, {p90:.3g}], over {BOOTSTRAP_SPAN:g}x")
    return out


def data_range(N, D, flops=None) -> dict[str, float]:
    """The span of the fitted runs, which a plan is measured against."""
    out = {
        "max_total_params": float(np.max(N)),
        "min_total_params": float(np.min(N)),
        "max_tokens": float(np.max(D)),
        "min_tokens": float(np.min(D)),
    }
    out["max_params_tokens"] = float(np.max(np.asarray(N, float) * np.asarray(D, float)))
    if flops is not None and np.isfinite(flops).any():
        out["max_flops"] = float(np.nanmax(flops))
    return out


def extrapolation(flops: float, total_params: float, tokens: float, data: dict[str, float]) -> dict[str, Any]:
    """How far a plan reaches past the data: budget, N and D over the largest fitted run's.

    `factor` is the budget's; without the runs' FLOPs, the plan's N·D over the largest N·D of a run
    (FLOPs are proportional to it for a given E and G). The warning is None within the data, and `loud`
    past WARN_FACTOR on any of the three.
    """
    n_factor = total_params / data["max_total_params"]
    d_factor = tokens / data["max_tokens"]
    if data.get("max_flops"):
        factor = flops / data["max_flops"]
    else:
        factor = (
            total_params
            * tokens
            / data.get("max_params_tokens", data["max_total_params"] * data["max_tokens"])
        )
    beyond = [
        f"{what} {x:.3g}x the largest fitted run's"
        for what, x in (("the budget is", factor), ("N is", n_factor), ("D is", d_factor))
        if x > 1
    ]
    warning = None
    loud = max(factor, n_factor, d_factor) > WARN_FACTOR
    if loud:
        warning = (
            f"EXTRAPOLATION: {'; '.join(beyond)}. Past {WARN_FACTOR:g}x a law fitted on these runs is a "
            "guess: run larger runs, or borrow exponents (`finemoe fit --prior paper`)"
        )
    elif beyond:
        warning = f"beyond the fitted runs: {'; '.join(beyond)}"
    return {
        "factor": factor,
        "total_params_factor": n_factor,
        "tokens_factor": d_factor,
        "warning": warning,
        "loud": loud,
    }


def percentiles(values) -> dict[str, float] | None:
    """p10/p50/p90 of the finite values, with how many there were; None when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return {f"p{q}": float(np.percentile(vals, q)) for q in QUANTILES} | {"n": len(vals)}


def quantiles(rows: list[dict[str, float | None]]) -> dict[str, Any]:
    """p10/p50/p90 of each quantity over the draws that gave one."""
    out: dict[str, Any] = {f"p{q}": {} for q in QUANTILES}
    for k in rows[0] if rows else []:
        band = percentiles(r.get(k) for r in rows)
        for q in QUANTILES:
            out[f"p{q}"][k] = band[f"p{q}"] if band else None
    out["n_draws"] = len(rows)
    return out


def over_draws(
    draws: Sequence[Any], fn: Callable[[Any], dict[str, float | None]]
) -> list[dict[str, float | None]]:
    """`fn` on each draw, skipping draws where it has no answer (a law that cannot reach a loss)."""
    rows = []
    for d in draws:
        try:
            rows.append(fn(d))
        except (ArithmeticError, ValueError):
            continue
    return rows


MAX_DRAWS = 200  # enough for p10/p90; each draw re-solves the plan


def _fit_meta(coeffs, law: str) -> dict[str, Any]:
    meta = (coeffs.extra.get("fit") or {}).get(law) if isinstance(coeffs.extra.get("fit"), dict) else None
    return meta if isinstance(meta, dict) else {}


def coefficient_flags(coeffs) -> dict[str, list[str]]:
    """Per law: the flags `fit` stored with it, else what the coefficients alone show."""
    out = {}
    for law in ("moe", "dense"):
        params = getattr(coeffs, law)
        if params is None:
            continue
        meta = _fit_meta(coeffs, law)
        stored = meta.get("flags")
        out[law] = (
            list(stored) if isinstance(stored, list) else fit_flags(vars(params), meta.get("fixed", ()))
        )
    return out


def draws_of(coeffs, law: str) -> list[dict[str, float]]:
    draws = (_fit_meta(coeffs, law).get("bootstrap") or {}).get("draws") or []
    return [d for d in draws if isinstance(d, dict)][:MAX_DRAWS]


def plan_uncertainty(coeffs, flops: float, settings) -> dict[str, Any] | None:
    """p10/p50/p90 of the plan over the bootstrap draws `fit --out` stored; None without draws.

    The MoE and dense fits were bootstrapped apart, so draw i of one is paired with draw i of the other:
    the dense multiple's band mixes both fits' uncertainty.
    """
    from finemoe.scaling import plan as P
    from finemoe.scaling.laws import CoefficientSet, DenseLaw, MoELaw

    moe, dense = draws_of(coeffs, "moe"), draws_of(coeffs, "dense")
    if not moe:
        return None

    def one(i_draw: tuple[int, dict[str, float]]) -> dict[str, float | None]:
        i, d = i_draw
        dl = DenseLaw(**dense[i % len(dense)]) if dense else None
        c = P.compare(CoefficientSet("draw", MoELaw(**d), dl, coeffs.expansion_rate), flops, settings)
        return {
            "granularity": c.moe.granularity,
            "active_params": c.moe.active_params,
            "tokens": c.moe.tokens,
            "loss": c.moe.loss,
            "dense_flops_multiple": c.dense_flops_multiple,
        }

    rows = over_draws(list(enumerate(moe)), one)
    return quantiles(rows) if rows else None


def plan_extrapolation(coeffs, flops: float, total_params: float, tokens: float) -> dict[str, Any] | None:
    data = _fit_meta(coeffs, "moe").get("data")
    if not isinstance(data, dict) or not data.get("max_total_params") or not data.get("max_tokens"):
        return None
    return extrapolation(flops, total_params, tokens, data)
