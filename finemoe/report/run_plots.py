"""Figures of observed runs (paper Fig. 3a/4 manner): loss vs G per (N, D), and loss vs FLOPs by kind.

Plots take a pandas DataFrame of finished runs (the store's columns) and draw headless to PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from finemoe.report.plots import save_figure
from finemoe.scaling.isoflop import parabola
from finemoe.units import count


def loss_vs_granularity(df, groups: list[dict], path: str | Path, loss: str = "train_loss") -> Path:
    """One panel per model size: observed loss vs G for each token budget, the fitted Eq. 4 curve
    g/G^γ + h through it, and the dense model at the same (size, D) as a dashed line."""
    moe = df[df.ffn == "moe"]
    sizes = sorted({(int(r.d_model), int(r.n_blocks)) for r in moe.itertuples()})
    fig = Figure(figsize=(4.6 * max(1, len(sizes)), 4.2))
    axes = fig.subplots(1, max(1, len(sizes)), squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    for ax, (d, n) in zip(axes[0], sizes):
        at = df[(df.d_model == d) & (df.n_blocks == n)]
        budgets = sorted(at.tokens.unique())
        for i, D in enumerate(budgets):
            color = cmap(i / max(1, len(budgets) - 1) * 0.85)
            m = at[(at.ffn == "moe") & (at.tokens == D)].sort_values("granularity")
            if m.empty:
                continue
            ax.plot(m.granularity, m[loss], "o", color=color, label=f"D={count(D)}")
            N = float(m.total_params.iloc[0])
            g = next(
                (
                    g
                    for g in groups
                    if math.isclose(g["N"], N, rel_tol=1e-9) and math.isclose(g["D"], D, rel_tol=1e-9)
                ),
                None,
            )
            if g is not None:
                G = np.geomspace(m.granularity.min(), m.granularity.max(), 50)
                ax.plot(
                    G,
                    g["g"] * G ** -g["gamma"] + g["h"],
                    "-",
                    color=color,
                    lw=1.2,
                    label=f"  Eq. 4: γ={g['gamma']:.2f}",
                )
            dn = at[(at.ffn == "dense") & (at.tokens == D)]
            if not dn.empty:
                ax.axhline(float(dn[loss].iloc[0]), color=color, ls="--", lw=1, alpha=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("granularity G")
        ax.set_ylabel(f"{loss.replace('_', ' ')} (nats)")
        nact = 12 * d * d * n
        ax.set_title(f"d={d}, {n} blocks, N_act {count(nact)}\n(dashed: dense at the same D)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def loss_vs_flops(df, path: str | Path, loss: str = "train_loss") -> Path:
    """Every finished run at its training FLOPs (paper model), dense and each G apart: at equal FLOPs,
    is a lower curve there for some G than for dense?"""
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    dense = df[df.ffn == "dense"].sort_values("flops")
    moe = df[df.ffn == "moe"]
    gs = sorted(moe.granularity.unique())
    cmap = matplotlib.colormaps["plasma"]
    for i, g in enumerate(gs):
        m = moe[moe.granularity == g].sort_values("flops")
        ax.plot(m.flops, m[loss], "o", ms=5, color=cmap(i / max(1, len(gs)) * 0.85), label=f"MoE G={int(g)}")
    if not dense.empty:
        ax.plot(dense.flops, dense[loss], "ks", ms=6, mfc="none", label="dense")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=(2.0, 5.0)))
    # narrow ranges have one decade tick or none: label the 2x and 5x ticks too ("5e12")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0e}".replace("e+", "e")))
    ax.set_xlabel("training FLOPs (paper model)")
    ax.set_ylabel(f"{loss.replace('_', ' ')} (nats)")
    ax.set_title("observed loss vs compute")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def isoflop_curves(runs, res: dict, path: str | Path, loss: str = "train_loss") -> Path:
    """One panel per budget: loss vs N_act for dense and each G, the approach-2 parabola through each
    curve, its minimum marked; a last panel: the best G per budget with its bootstrap p10-p90."""
    budgets = res["budgets"]
    fig = Figure(figsize=(4.6 * (len(budgets) + 1), 4.2))
    axes = fig.subplots(1, len(budgets) + 1, squeeze=False)
    gs = sorted({int(g) for g in runs.granularity})
    cmap = matplotlib.colormaps["viridis"]
    opt = {(o["budget"], o["granularity"]): o for o in res["optima"]}
    for ax, F in zip(axes[0], budgets):
        for i, G in enumerate(gs):
            sel = (runs.budget == F) & (runs.granularity == G)
            if not sel.any():
                continue
            color = "black" if G == 0 else cmap(i / max(1, len(gs) - 1) * 0.85)
            x, y = runs.active_params[sel], runs.loss[sel]
            order = np.argsort(x)
            name = "dense" if G == 0 else f"G={G}"
            ax.plot(x[order], y[order], "o", color=color, label=name, ms=4)
            coef = parabola(x, y)
            if coef is not None:
                a, b, c = coef
                xs = np.geomspace(x.min(), x.max(), 40)
                ax.plot(
                    xs, a * np.log(xs) ** 2 + b * np.log(xs) + c, "--" if G == 0 else "-", color=color, lw=1
                )
            o = opt.get((F, G))
            if o is not None and o["inside"]:
                ax.plot([o["active_params"]], [o["loss"]], "*", color=color, ms=11, mec="white")
        ax.set_xscale("log")
        ax.set_xlabel("active params N_act")
        ax.set_ylabel(f"{loss.replace('_', ' ')} (nats)")
        ax.set_title(f"{F:.3g} FLOPs (★ minimum of the parabola)", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    best = res["bootstrap"]["best_granularity_log2"]
    xs = [F for F in budgets if best.get(F) and "p50" in best[F]]
    if xs:
        mid = [2 ** best[F]["p50"] for F in xs]
        lo = [2 ** best[F]["p10"] for F in xs]
        hi = [2 ** best[F]["p90"] for F in xs]
        ax.fill_between(xs, lo, hi, alpha=0.3, label="bootstrap p10-p90")
        ax.plot(xs, mid, "o-", label="bootstrap p50")
    point = [(F, res["best_granularity"][F]) for F in budgets if res["best_granularity"][F]]
    ax.plot([F for F, _ in point], [g for _, g in point], "k*", ms=11, label="all runs")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("compute budget (FLOPs)")
    ax.set_ylabel("best G at the budget")
    ax.set_title("does the best G grow with compute?", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def training_curves(metrics: list[dict], path: str | Path, title: str = "") -> Path:
    """A run's metrics.jsonl as three panels: train loss (raw and smoothed) with validation loss, the
    learning rate, and tokens/s, each against tokens seen."""
    steps = [m for m in metrics if "loss" in m]
    if not steps:
        raise ValueError("no training steps in the metrics")
    tokens = [m["tokens"] for m in steps]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    loss_ax, lr_ax, speed_ax = fig.subplots(1, 3)
    loss_ax.plot(tokens, [m["loss"] for m in steps], color="lightgray", lw=0.8, label="train loss")
    loss_ax.plot(tokens, [m["loss_smooth"] for m in steps], color="tab:blue", label="train loss, smoothed")
    val = [(m["tokens"], m["val_loss"]) for m in steps if m.get("val_loss") is not None]
    if val:
        loss_ax.plot(*zip(*val), "o-", color="tab:red", label="validation loss")
    loss_ax.set_ylabel("loss (nats)")
    loss_ax.legend(fontsize=8)
    lr_ax.plot(tokens, [m["lr"] for m in steps], color="tab:green")
    lr_ax.set_ylabel("learning rate")
    speed_ax.plot(tokens, [m["tokens_per_s"] for m in steps], color="tab:purple", lw=0.8)
    speed_ax.set_ylabel("tokens/s")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.set_xlabel("tokens seen")
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
