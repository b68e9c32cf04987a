"""Figures in the manner of the paper's Fig. 1 and Fig. 5a, drawn headless (Agg) to PNG files."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

from finemoe.io import atomic_path
from finemoe.scaling import plan as P


def save_figure(fig, path) -> Path:
    """A figure as PNG, written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def _budget_grid(marks: Sequence[float], lo=1e18, hi=1e26, n=41) -> np.ndarray:
    lo = min([lo, *marks]) / 2
    hi = max([hi, *marks]) * 2
    return np.logspace(math.log10(lo), math.log10(hi), n)


def _g_colors(gs):
    cmap = matplotlib.colormaps["viridis"]
    uniq = sorted(set(gs))
    return {g: cmap(i / max(1, len(uniq) - 1)) for i, g in enumerate(uniq)}


def loss_vs_flops(ax, coeffs, s: P.Settings, budgets: Sequence[float], marks: Sequence[float] = ()) -> None:
    """Fig. 1a: loss of the compute-optimal MoE (coloured by its G), G=1 MoE and dense, against FLOPs."""
    law = coeffs.require("moe")
    opt = [P.optimum(law, F, s) for F in budgets]
    s1 = replace(s, granularities=(1,), continuous_g=False)
    g1 = [P.optimum(law, F, s1).loss for F in budgets]
    gs = [p.granularity for p in opt]
    colors = _g_colors(gs)
    loss = np.array([p.loss for p in opt])
    for i in range(len(budgets) - 1):
        ax.plot(budgets[i : i + 2], loss[i : i + 2], color=colors[gs[i]], lw=2.5)
    for g, col in colors.items():
        ax.plot([], [], color=col, lw=2.5, label=f"optimal MoE, G={g:g}")
    ax.plot(budgets, g1, ":", color="tab:orange", label="MoE, G=1")
    if coeffs.dense is not None:
        ax.plot(
            budgets,
            [P.dense_optimum(coeffs.dense, F, s).loss for F in budgets],
            "--",
            color="tab:red",
            label="dense",
        )
    for F in marks:
        p = P.optimum(law, F, s)
        ax.plot([F], [p.loss], "o", color="black", ms=5)
        ax.annotate(
            f"G={p.granularity:g}\nN_act={p.active_params:.2g}",
            (F, p.loss),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [
        t
        for t in (1.2, 1.5, 1.8, 2.2, 2.7, 3.3, 4.0)
        if loss.min() * 0.9 <= t <= max(loss.max(), max(g1)) * 1.2
    ]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}" for t in ticks]))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("predicted loss")
    caps = f", {s.caps_text()} at most" if s.capped else ""
    ax.set_title(f"compute-optimal loss ({coeffs.name}, E={s.expansion_rate:g}{caps})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)


def compute_multiples(
    ax, coeffs, s: P.Settings, budgets: Sequence[float], marks: Sequence[float] = ()
) -> None:
    """Fig. 1b: FLOPs a dense model and a G=1 MoE need to match the optimal MoE, as a multiple."""
    rows = [P.compare(coeffs, F, s) for F in budgets]
    if coeffs.dense is not None:
        ax.plot(budgets, [r.dense_flops_multiple for r in rows], "-", color="tab:red", label="dense")
    ax.plot(budgets, [r.g1_flops_multiple for r in rows], "-", color="tab:orange", label="MoE, G=1")
    for F in marks:
        r = P.compare(coeffs, F, s)
        for m in (r.dense_flops_multiple, r.g1_flops_multiple):
            if m is not None:
                ax.plot([F], [m], "o", color="black", ms=4)
                ax.annotate(f"{m:.1f}x", (F, m), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 30, 40]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FixedFormatter(["1", "2", "5", "10", "20", "30", "40"]))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(1, 50)
    ax.set_xlabel("training FLOPs of the optimal MoE")
    ax.set_ylabel("FLOPs multiple to match its loss")
    ax.set_title("compute multiple vs optimal-G MoE")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def isoflop_over_g(ax, law, s: P.Settings, budgets: Sequence[float]) -> None:
    """Loss of the best model at each G for fixed budgets; dots mark the optimum over the G grid."""
    gmax = max(512.0, max(s.granularities))
    G = np.logspace(0, math.log10(gmax), 37)
    cmap = matplotlib.colormaps["plasma"]
    for i, F in enumerate(budgets):
        col = cmap(i / max(1, len(budgets)))
        ax.plot(G, [P.optimum_for_g(law, F, g, s).loss for g in G], color=col, label=f"{F:.2g} FLOPs")
        best = P.optimum(law, F, s)
        ax.plot([best.granularity], [best.loss], "o", color=col)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("granularity G")
    ax.set_ylabel("predicted loss at the best d_model")
    ax.set_title("iso-FLOP curves over G (dot: optimum)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def pred_vs_obs(ax, res) -> None:
    """Fig. 5a: predicted against observed loss, fitted runs and held-out best runs."""
    ho = res.holdout
    if ho is not None:
        keep = np.ones(len(res.observed), bool)
        keep[ho["index"]] = False
        ax.scatter(res.observed[keep], res.predicted[keep], s=14, label=f"fitted (RMSE {res.rmse:.3f})")
        ax.scatter(
            ho["observed"],
            ho["predicted"],
            s=14,
            marker="s",
            label=f"held-out best {ho['fraction']:.0%}, refit without them (RMSE {ho['rmse']:.3f})",
        )
    else:
        ax.scatter(res.observed, res.predicted, s=14, label=f"fitted (RMSE {res.rmse:.3f})")
    lo = min(res.observed.min(), res.predicted.min())
    hi = max(res.observed.max(), res.predicted.max())
    pad = 0.03 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title(f"{res.law} law: predicted vs observed ({res.n_points} runs)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


# --- one figure per command --------------------------------------------------------------------


def plan_figure(coeffs, s: P.Settings, marks: Sequence[float], path) -> None:
    fig = Figure(figsize=(12, 4.8))
    (a, b) = fig.subplots(1, 2)
    loss_vs_flops(a, coeffs, s, _budget_grid(marks), marks)
    iso = list(marks) if len(marks) > 1 else [marks[0] / 100, marks[0], marks[0] * 100]
    isoflop_over_g(b, coeffs.require("moe"), s, iso)
    save_figure(fig, path)


def savings_figure(coeffs, s: P.Settings, marks: Sequence[float], path) -> None:
    fig = Figure(figsize=(12, 4.8))
    (a, b) = fig.subplots(1, 2)
    grid = _budget_grid(marks)
    loss_vs_flops(a, coeffs, s, grid)
    compute_multiples(b, coeffs, s, grid, marks)
    save_figure(fig, path)


def fit_figure(res, path) -> None:
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    pred_vs_obs(ax, res)
    save_figure(fig, path)


def fan_figure(coeffs, s: P.Settings, flops: float, path, span: float = 1e4, n: int = 9) -> None:
    """The plan's bootstrap band (p10-p90 shaded, p50 line) over budgets around `flops`."""
    from finemoe.scaling.trust import plan_uncertainty

    budgets = np.geomspace(flops / math.sqrt(span), flops * math.sqrt(span), n)
    bands = [plan_uncertainty(coeffs, float(F), s) for F in budgets]
    fig = Figure(figsize=(18, 4.2))
    axes = fig.subplots(1, 4)
    for ax, (key, label) in zip(
        axes,
        (
            ("granularity", "optimal G"),
            ("active_params", "optimal N_act"),
            ("tokens", "optimal D"),
            ("loss", "loss at the optimum"),
        ),
    ):
        q = {
            p: np.array([b[p][key] if b and b[p][key] is not None else np.nan for b in bands], float)
            for p in ("p10", "p50", "p90")
        }
        ax.fill_between(budgets, q["p10"], q["p90"], alpha=0.3, label="p10-p90")
        ax.plot(budgets, q["p50"], marker="o", label="p50")
        ax.axvline(flops, color="grey", linestyle=":", label="this budget")
        ax.set_xscale("log")
        if key != "loss":
            ax.set_yscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"compute-optimal plan over {bands[len(bands) // 2]['n_draws'] if bands[len(bands) // 2] else 0} "
        f"bootstrap draws of {coeffs.name}"
    )
    save_figure(fig, path)
