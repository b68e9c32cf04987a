"""Iso-FLOP analysis (Chinchilla's approach 2) per granularity, with a bootstrap over run groups. No torch.

At each compute budget, each FFN kind (dense, or MoE at one G) has runs at several sizes; a parabola in
log N_act through their losses puts the compute-optimal size and loss at its minimum. Comparing those
minima across G answers which G is best at that budget, and whether that grows with the budget; the
dense minima, linear in log FLOPs across budgets, say how much compute dense needs to match the best MoE.

The bootstrap resamples whole groups (a stable run and its cooldown branches: one size and FFN across
budgets) with replacement, so the curves of one draw stay consistent across budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from finemoe.errors import DataError
from finemoe.scaling.trust import percentiles

DENSE = 0  # the granularity label of dense runs


@dataclass(frozen=True)
class IsoRuns:
    """One row per finished run of an iso-FLOP sweep."""

    budget: np.ndarray
    active_params: np.ndarray
    granularity: np.ndarray  # 0 for dense
    loss: np.ndarray
    group: np.ndarray

    def take(self, idx) -> "IsoRuns":
        return IsoRuns(
            *(getattr(self, k)[idx] for k in ("budget", "active_params", "granularity", "loss", "group"))
        )


@dataclass(frozen=True)
class Optimum:
    """The parabola's minimum over the sizes run, for one (budget, FFN). When its vertex lies outside them
    (`beyond` says on which side), the minimum is the curve at that edge, not the extrapolated vertex: the
    compute-optimal size is past the grid, which should move, and comparing G at the edge compares what
    the runs support rather than a guess."""

    active_params: float
    loss: float
    inside: bool
    n_sizes: int
    beyond: str = ""  # "below" or "above" the sizes run when not inside


def parabola(active_params: Sequence[float], loss: Sequence[float]) -> tuple[float, float, float] | None:
    """Least-squares loss = a·x² + b·x + c with x = ln N_act; None with fewer than 3 sizes."""
    x, y = np.log(np.asarray(active_params, float)), np.asarray(loss, float)
    if len(np.unique(x)) < 3:
        return None
    a, b, c = np.polyfit(x, y, 2)
    return float(a), float(b), float(c)


def parabola_optimum(active_params: Sequence[float], loss: Sequence[float]) -> Optimum | None:
    """The minimum of `parabola` within the sizes run; None unless it has a vertex (3+ sizes, a > 0)."""
    coef = parabola(active_params, loss)
    if coef is None:
        return None
    a, b, c = coef
    x = np.log(np.asarray(active_params, float))
    if not a > 0:
        return None
    x0 = -b / (2 * a)
    beyond = "below" if x0 < x.min() else "above" if x0 > x.max() else ""
    x0 = float(np.clip(x0, x.min(), x.max()))
    return Optimum(
        float(math.exp(x0)),
        float(a * x0 * x0 + b * x0 + c),
        not beyond,
        int(len(np.unique(x))),
        beyond,
    )


def optima(runs: IsoRuns) -> dict[tuple[float, int], Optimum]:
    """(budget, G) → the parabola's optimum, for every curve that has one."""
    out = {}
    for F in np.unique(runs.budget):
        for G in np.unique(runs.granularity[runs.budget == F]):
            sel = (runs.budget == F) & (runs.granularity == G)
            opt = parabola_optimum(runs.active_params[sel], runs.loss[sel])
            if opt is not None:
                out[(float(F), int(G))] = opt
    return out


def best_granularity(opt: dict[tuple[float, int], Optimum], budget: float) -> int | None:
    """The MoE G whose iso-FLOP minimum is lowest at `budget` (dense excluded)."""
    at = {G: o.loss for (F, G), o in opt.items() if F == budget and G != DENSE}
    return min(at, key=at.get) if at else None


def dense_multiple(opt: dict[tuple[float, int], Optimum], budget: float) -> float | None:
    """Dense compute to reach the best MoE's optimal loss at `budget`, over `budget`.

    The dense optima are a line in ln F (least squares over the budgets that have one); a multiple > 1
    means the MoE wins. None with fewer than two dense optima or a dense line that does not fall.
    """
    dense = sorted((F, o.loss) for (F, G), o in opt.items() if G == DENSE)
    G = best_granularity(opt, budget)
    if len(dense) < 2 or G is None:
        return None
    slope, icpt = np.polyfit(np.log([F for F, _ in dense]), [L for _, L in dense], 1)
    if not slope < 0:
        return None
    target = opt[(budget, G)].loss
    return float(math.exp((target - icpt) / slope) / budget)


def summarize(opt: dict[tuple[float, int], Optimum]) -> dict[str, Any]:
    budgets = sorted({F for F, _ in opt})
    return {
        "budgets": budgets,
        "optima": [
            {
                "budget": F,
                "granularity": G,
                "active_params": o.active_params,
                "loss": o.loss,
                "inside": o.inside,
                "beyond": o.beyond,
                "n_sizes": o.n_sizes,
            }
            for (F, G), o in sorted(opt.items())
        ],
        "best_granularity": {F: best_granularity(opt, F) for F in budgets},
        "dense_flops_multiple": {F: dense_multiple(opt, F) for F in budgets},
    }


def analyse(runs: IsoRuns, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """The optima, best G and dense multiple per budget, with p10/p50/p90 over group resamples."""
    if len(runs.loss) == 0 or not np.all(np.isfinite(runs.loss)):
        raise DataError("iso-FLOP analysis needs finished runs with finite losses")
    point = summarize(optima(runs))
    if not point["optima"]:
        raise DataError("no (budget, FFN) has runs at 3 or more sizes: an iso-FLOP curve needs them")
    point["best_run"] = best_runs(runs)
    labels, members = np.unique(runs.group, return_inverse=True)
    by_group = [np.flatnonzero(members == i) for i in range(len(labels))]
    rng = np.random.default_rng(seed)
    sizes = np.unique(runs.active_params)
    by_size = [np.flatnonzero(runs.active_params == n) for n in sizes]
    draws, best_draws = [], []
    for _ in range(bootstrap):
        idx = np.concatenate([by_group[i] for i in rng.integers(0, len(labels), len(labels))])
        draws.append(summarize(optima(runs.take(idx))))
        # the best runs resample whole sizes, every FFN with them, so MoE and dense stay paired
        idx = np.concatenate([by_size[i] for i in rng.integers(0, len(sizes), len(sizes))])
        best_draws.append(best_runs(runs.take(idx)))
    point["bootstrap"] = _bands(point, draws)
    point["best_run"]["bootstrap"] = _best_run_bands(point["best_run"], best_draws)
    point["grows"] = _grows(point, draws)
    point["at_fixed_size"] = at_fixed_size(runs)
    point["fixed_size_trends"] = fixed_size_trends(point["at_fixed_size"])
    return point


def at_fixed_size(runs: IsoRuns) -> list[dict[str, Any]]:
    """Per (size, budget), every FFN's loss and the best MoE G among them.

    All FFNs of one size share its embedding and attention, which the paper's FLOPs leave out, so this
    comparison of G holds whatever the compute-optimal size is; it needs no parabola.
    """
    rows = []
    for n in np.unique(runs.active_params):
        for F in np.unique(runs.budget[runs.active_params == n]):
            sel = (runs.active_params == n) & (runs.budget == F)
            gs, ls = runs.granularity[sel], runs.loss[sel]  # several seeds of one FFN: their mean
            losses = {int(g): float(ls[gs == g].mean()) for g in np.unique(gs)}
            moe = {g: v for g, v in losses.items() if g != DENSE}
            best = min(moe, key=moe.get) if moe else None
            rows.append(
                {
                    "active_params": float(n),
                    "budget": float(F),
                    "loss": losses,
                    "best_granularity": best,
                    "best_moe_minus_dense": (
                        moe[best] - losses[DENSE] if best is not None and DENSE in losses else None
                    ),
                }
            )
    return rows


def fixed_size_trends(
    rows: list[dict[str, Any]], min_granularities: int | None = None
) -> list[dict[str, Any]]:
    """For each size with two or more budgets at which `min_granularities` MoE G finished (default:
    every G the runs have), the best G per budget in order of compute, and whether it grows from the
    smallest budget to the largest."""
    if min_granularities is None:
        min_granularities = len({g for r in rows for g in r["loss"] if g != DENSE})
    out = []
    for n in sorted({r["active_params"] for r in rows}):
        mine = sorted(
            (
                r
                for r in rows
                if r["active_params"] == n and len(r["loss"]) - (DENSE in r["loss"]) >= min_granularities
            ),
            key=lambda r: r["budget"],
        )
        if len(mine) < 2:
            continue
        best = [r["best_granularity"] for r in mine]
        out.append(
            {
                "active_params": n,
                "budgets": [r["budget"] for r in mine],
                "best_granularity": best,
                "grows": best[-1] > best[0],
                "shrinks": best[-1] < best[0],
            }
        )
    return out


def best_runs(runs: IsoRuns) -> dict[str, Any]:
    """Per budget, each FFN's lowest loss over the sizes run, and the best MoE G by it.

    The model-free reading of an iso-FLOP grid: it needs no curve shape, so it answers where a parabola
    has no minimum (curves still falling at the grid's edge, or sizes of unlike shapes), at the price
    of resolving the optimum only to the sizes run.
    """
    out: dict[str, Any] = {"budgets": [], "loss": {}, "best_granularity": {}, "best_moe_minus_dense": {}}
    for F in np.unique(runs.budget):
        at = runs.budget == F
        low = {
            int(g): float(runs.loss[at & (runs.granularity == g)].min())
            for g in np.unique(runs.granularity[at])
        }
        moe = {g: v for g, v in low.items() if g != DENSE}
        best = min(moe, key=moe.get) if moe else None
        F = float(F)
        out["budgets"].append(F)
        out["loss"][F] = low
        out["best_granularity"][F] = best
        out["best_moe_minus_dense"][F] = moe[best] - low[DENSE] if best is not None and DENSE in low else None
    return out


def _best_run_bands(point: dict[str, Any], draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares of the draws per best G, the gap's percentiles per budget, and how often the best G at
    the largest budget with an MoE run exceeds the one at the smallest."""
    return {
        "n": len(draws),
        "share": {F: _shares(draws, F) for F in point["budgets"]},
        "best_moe_minus_dense": {
            F: percentiles([d["best_moe_minus_dense"].get(F) for d in draws]) for F in point["budgets"]
        },
        "grows": _grows(point, draws),
    }


def _picks(draws: list[dict[str, Any]], F: float) -> list[int]:
    """The best G of each draw that has one at budget F."""
    return [g for d in draws if (g := d["best_granularity"].get(F)) is not None]


def _shares(draws: list[dict[str, Any]], F: float) -> dict[int, float]:
    picks = _picks(draws, F)
    return {int(g): picks.count(g) / len(picks) for g in sorted(set(picks))}


def _bands(point: dict[str, Any], draws: list[dict[str, Any]]) -> dict[str, Any]:
    curves = {}
    for o in point["optima"]:
        key = (o["budget"], o["granularity"])
        mine = [p for d in draws for p in d["optima"] if (p["budget"], p["granularity"]) == key]
        curves[f"{o['budget']:.4g}/G{o['granularity']}"] = {
            "active_params": percentiles([p["active_params"] for p in mine]),
            "loss": percentiles([p["loss"] for p in mine]),
            "n_draws": len(mine),
        }
    best = {
        F: {"share": _shares(draws, F), **(percentiles([math.log2(g) for g in _picks(draws, F)]) or {})}
        for F in point["budgets"]
    }
    return {
        "n": len(draws),
        "curves": curves,
        "best_granularity_log2": best,
        "dense_flops_multiple": {
            F: percentiles([d["dense_flops_multiple"].get(F) for d in draws]) for F in point["budgets"]
        },
    }


def _grows(point: dict[str, Any], draws: list[dict[str, Any]]) -> dict[str, Any]:
    """Does the best G at the largest budget with an MoE pick exceed the one at the smallest? In the
    point estimate and in what share of the draws (ties count as not growing). Serves both readings:
    the parabolas' optima and the best runs."""
    moe = [F for F in point["budgets"] if point["best_granularity"][F] is not None]
    lo, hi = (moe[0], moe[-1]) if moe else (point["budgets"][0], point["budgets"][-1])
    pairs = [(d["best_granularity"].get(lo), d["best_granularity"].get(hi)) for d in draws]
    pairs = pairs if lo != hi else []  # one budget: nothing to grow from
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    g_lo, g_hi = point["best_granularity"][lo], point["best_granularity"][hi]
    return {
        "smallest_budget": lo,
        "largest_budget": hi,
        "best_at_smallest": g_lo,
        "best_at_largest": g_hi,
        "grows": None if g_lo is None or g_hi is None or lo == hi else g_hi > g_lo,
        "share_of_draws_growing": sum(b > a for a, b in pairs) / len(pairs) if pairs else None,
        "share_of_draws_shrinking": sum(b < a for a, b in pairs) / len(pairs) if pairs else None,
    }
