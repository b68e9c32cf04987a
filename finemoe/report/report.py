"""The Markdown report of a results store: runs, granularity curves, fitted laws, planner answers.

A thin assembler: fitting lives in finemoe.scaling.fit, planning in finemoe.scaling.plan, figures in
finemoe.report.plots / run_plots. A section whose law the data cannot identify says why instead of
failing the report, so a partial sweep still gets a report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from finemoe.errors import DataError, FinemoeError
from finemoe.io import ensure_dir, write_text_atomic
from finemoe.units import count

DEFAULT_BUDGETS = (1e15, 1e17, 1e19, 1e21)
# The store's columns the report reads (a `finemoe sweep export` CSV has them all). Without the
# first set there is nothing to fit; the others only fill the runs table and the summary.
NEEDED = (
    "status",
    "ffn",
    "granularity",
    "expansion_rate",
    "d_model",
    "n_blocks",
    "total_params",
    "tokens",
    "flops",
)
NUMERIC = (
    "granularity",
    "expansion_rate",
    "d_model",
    "n_blocks",
    "total_params",
    "active_params",
    "tokens",
    "flops",
    "train_loss",
    "val_loss",
    "wall_time_s",
)
OPTIONAL = (
    "run_id",
    "active_params",
    "train_loss",
    "val_loss",
    "wall_time_s",
    "device",
    "code_version",
    "error",
)


@dataclass
class ReportOptions:
    loss: str = "train_loss"  # the paper fits the smoothed train loss
    bootstrap: int = 100
    holdout: float = 0.2
    fix_c: float | None = None  # Eq. 9 / Eq. 1 with the irreducible loss c fixed (small sweeps)
    budgets: Sequence[float] = DEFAULT_BUDGETS
    paper_coefficients: str = "paper"
    title: str | None = None
    notes: list[str] = field(default_factory=list)
    filename: str = "report.md"
    discussion: str | None = None  # the author's reading of the results, appended as written


def _checked(df, results):
    """The run table with the columns the report reads, numbers as numbers, or a one-line error."""
    import pandas as pd

    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise DataError(f"{results} lacks column(s) {missing}; give a store or a `finemoe sweep export` CSV")
    df = df.copy()
    for c in OPTIONAL:
        if c not in df.columns:
            df[c] = range(1, len(df) + 1) if c == "run_id" else None
    for c in NUMERIC:
        try:
            df[c] = pd.to_numeric(df[c])
        except (ValueError, TypeError):
            raise DataError(
                f"{results}: column {c!r} holds text where numbers belong; fix or drop those rows"
            ) from None
    return df


def _num(x: Any, fmt: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _points(df, loss: str):
    from finemoe.scaling.fit import Points
    from finemoe.scaling.runs import run_groups

    g = df.granularity.where(df.ffn == "moe", 1).astype(float)
    flops = df.flops.astype(float).to_numpy() if "flops" in df.columns else None
    return Points(
        df.total_params.astype(float).to_numpy(),
        df.tokens.astype(float).to_numpy(),
        g.to_numpy(),
        df[loss].astype(float).to_numpy(),
        flops,
        run_groups(df.to_dict("records")),
    )


# -- sections ------------------------------------------------------------------------------------


def _summary(df, source: str) -> str:
    counts = df.status.value_counts().to_dict()
    devices = sorted({str(d) for d in df.device.dropna().unique()})
    versions = sorted({str(v) for v in df.code_version.dropna().unique()})
    wall = df.wall_time_s.fillna(0).sum()
    lines = [
        f"- results: `{source}`",
        "- runs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"- devices: {', '.join(devices) or '–'}",
        f"- code: {', '.join(versions) or '–'}",
        f"- total training wall time: {wall / 3600:.2f} h ({wall:.0f} s)",
    ]
    return "\n".join(lines)


def _runs_table(df, loss: str) -> str:
    d = df.copy()
    d["_g"] = d.granularity.where(d.ffn == "moe", 0)
    d = d.sort_values(["d_model", "n_blocks", "tokens", "_g"])
    # runs that recorded it: the validation loss with each sequence routed alone (Expert Choice inference)
    alone = "val_loss_independent" in d.columns and d.val_loss_independent.notna().any()
    rows = []
    for r in d.itertuples():
        kind = "dense" if r.ffn == "dense" else f"E{int(r.expansion_rate)} G{int(r.granularity)}"
        lines = r.error.strip().splitlines() if isinstance(r.error, str) else []
        err = lines[-1][:60] if lines and r.status != "done" else ""
        rows.append(
            [
                r.run_id,
                f"{int(r.d_model)}×{int(r.n_blocks)}",
                kind,
                count(r.total_params),
                count(r.active_params),
                count(r.tokens),
                count(r.flops),
                _num(r.train_loss),
                _num(r.val_loss),
                *([_num(r.val_loss_independent)] if alone else []),
                _num(r.wall_time_s, ".0f"),
                r.status + (f": {err}" if err else ""),
            ]
        )
    header = ["run", "d×blocks", "FFN", "N", "N_act", "D", "FLOPs", "train loss", "val loss"]
    return _table(header + (["val loss, alone"] if alone else []) + ["wall s", "status"], rows)


def _granularity_section(done, out: Path, o: ReportOptions) -> tuple[str, list[dict]]:
    from finemoe.report.run_plots import loss_vs_granularity
    from finemoe.scaling.fit import fit

    moe = done[done.ffn == "moe"]
    groups: list[dict] = []
    text = []
    try:
        res = fit(_points(moe, o.loss), law="granularity", holdout=None)
        groups = res.groups
        text.append(
            _table(
                ["N", "D", "runs", "g", "γ", "h", "RMSE"],
                [
                    [
                        count(g["N"]),
                        count(g["D"]),
                        g["n_points"],
                        _num(g["g"], ".3f"),
                        _num(g["gamma"], ".3f"),
                        _num(g["h"], ".3f"),
                        _num(g["rmse"], ".4f"),
                    ]
                    for g in groups
                ],
            )
        )
        gam = [g["gamma"] for g in groups]
        text.append(
            f"\nγ per (N, D) ranges {min(gam):.3f}–{max(gam):.3f} (paper: γ > 0 means finer experts help)."
        )
    except (FinemoeError, ValueError) as e:
        text.append(f"Eq. 4 not fitted: {e}")
    if not moe.empty:
        loss_vs_granularity(done, groups, out / "loss_vs_granularity.png", o.loss)
        text.insert(0, "![loss vs G](loss_vs_granularity.png)\n")
    return "\n".join(text), groups


def _law_fit(pts, law: str, o: ReportOptions, n_min: int):
    from finemoe.scaling.fit import fit, n_free_params

    fixed = {"c": o.fix_c} if o.fix_c is not None else None
    n_free = n_free_params(law, fixed)
    holdout = o.holdout if len(pts) - round(o.holdout * len(pts)) >= n_free + 1 else None
    try:
        return fit(
            pts, law=law, fixed=fixed, holdout=holdout, bootstrap=o.bootstrap if len(pts) >= n_min else 0
        )
    except DataError as e:
        if "bootstrap" not in str(e):
            raise
        return fit(
            pts, law=law, fixed=fixed, holdout=holdout, bootstrap=0
        )  # intervals impossible, fit still is


def _coef_table(res, names: Sequence[str]) -> str:
    bs = (res.bootstrap or {}).get("values", {})
    pct = (res.bootstrap or {}).get("percentiles", [10, 90])
    rows = []
    for k in names:
        v = res.params.get(k, res.fixed.get(k))
        lo_hi = bs.get(k)
        ci = f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else ("fixed" if k in res.fixed else "–")
        rows.append([k, _num(v, ".4g"), ci])
    return _table(["coefficient", "value", f"bootstrap p{pct[0]:g}–p{pct[-1]:g}"], rows)


def degenerate(res) -> str | None:
    """Why a fit cannot be read as a law (finemoe.scaling.trust.fit_flags), or None."""
    return "; ".join(res.flags) or None


def _prior_comparison(pts, law: str, res, o: ReportOptions) -> str:
    """Held-out RMSE of the free fit against one that borrows the paper's exponents (Choshen et al. 2024)."""
    from finemoe.scaling.fit import fit
    from finemoe.scaling.laws import prior_exponents

    if not res.holdout:
        return ""
    fixed = prior_exponents("paper", law)
    if o.fix_c is not None:
        fixed["c"] = o.fix_c
    try:
        borrowed = fit(pts, law=law, fixed=fixed, holdout=res.holdout["fraction"])
    except (FinemoeError, ValueError):
        return ""
    names = ", ".join(fixed)
    return _table(
        ["fit", "in-sample RMSE", f"held-out RMSE (best {res.holdout['fraction']:.0%})"],
        [
            ["all exponents free", _num(res.rmse), _num(res.holdout["rmse"])],
            [
                f"{names} fixed at the paper's (`fit --prior paper`)",
                _num(borrowed.rmse),
                _num(borrowed.holdout["rmse"]),
            ],
        ],
    )


def _fit_summary(res) -> str:
    parts = [f"{res.n_points} runs, in-sample RMSE {res.rmse:.4f}"]
    if res.holdout:
        parts.append(
            f"held-out best {res.holdout['fraction']:.0%} ({res.holdout['n_heldout']} runs) RMSE "
            f"{res.holdout['rmse']:.4f} after refitting without them"
        )
    else:
        parts.append("too few runs to hold any out")
    if res.bootstrap:
        parts.append(f"{res.bootstrap['n']} bootstrap refits")
    return "; ".join(parts) + "."


def _fit_with_figure(runs, law: str, eq: str, out: Path, o: ReportOptions, n_min: int):
    """(fit, None, prior comparison) with its predicted-vs-observed figure written as fit_<law>.png, or
    (None, why not, "")."""
    from finemoe.report.plots import fit_figure

    try:
        pts = _points(runs, o.loss)
        res = _law_fit(pts, law, o, n_min)
    except (FinemoeError, ValueError) as e:
        return None, f"{eq} not fitted: {e}", ""
    fit_figure(res, out / f"fit_{law}.png")
    return res, None, _prior_comparison(pts, law, res, o)


def _moe_section(done, out: Path, o: ReportOptions):
    res, why, prior = _fit_with_figure(done[done.ffn == "moe"], "moe", "Eq. 9", out, o, 8)
    if res is None:
        return why, None
    text = [_coef_table(res, ["g", "gamma", "a", "alpha", "b", "beta", "c"]), "", _fit_summary(res)]
    if prior:
        text += ["", prior]
    g = res.params.get("gamma")
    ci = (res.bootstrap or {}).get("values", {}).get("gamma")
    bad = degenerate(res)
    if bad:
        text.append(
            f"\n**Degenerate fit** ({bad}): these runs do not pin down every term of Eq. 9; read γ from "
            "the per-(N, D) fits above, and the planner's fitted column as meaningless."
        )
    elif g is not None:
        verdict = (
            "finer experts help (γ > 0"
            + (f", interval [{ci[0]:.3g}, {ci[1]:.3g}] above 0)" if ci and ci[0] > 0.01 else ")")
            if g > 0.01
            else "no measurable benefit of granularity (γ ≈ 0)"
        )
        text.append(f"\nFitted γ = {g:.3f}: {verdict}. Paper (Table 1): γ = 0.58.")
    text.append("\n![predicted vs observed, Eq. 9](fit_moe.png)")
    return "\n".join(text), res


def _dense_section(done, out: Path, o: ReportOptions):
    res, why, prior = _fit_with_figure(done[done.ffn == "dense"], "dense", "Eq. 1", out, o, 6)
    if res is None:
        return why, None
    bad = degenerate(res)
    warn = f"\n**Degenerate fit** ({bad}): these runs do not identify Eq. 1." if bad else ""
    return "\n".join(
        [_coef_table(res, ["a", "alpha", "b", "beta", "c"]), "", _fit_summary(res) + warn]
        + (["", prior] if prior else [])
        + ["\n![predicted vs observed, Eq. 1](fit_dense.png)"]
    ), res


def dense_loss_at(flops: float, dense_flops: Sequence[float], dense_loss: Sequence[float]) -> float | None:
    """A size's dense loss at `flops`, linear in log FLOPs through its two nearest dense runs
    (extrapolated along the end segment outside them); None with fewer than two runs."""
    x = np.log(np.asarray(dense_flops, float))
    y = np.asarray(dense_loss, float)
    if len(x) < 2 or len(np.unique(x)) < 2:
        return None
    order = np.argsort(x)
    x, y = x[order], y[order]
    i = int(np.clip(np.searchsorted(x, math.log(flops)), 1, len(x) - 1))
    t = (math.log(flops) - x[i - 1]) / (x[i] - x[i - 1])
    return float(y[i - 1] + t * (y[i] - y[i - 1]))


def _equal_flops_section(done, out: Path, o: ReportOptions) -> str:
    from finemoe.report.run_plots import loss_vs_flops

    rows = []
    for (d, n, D), at in done.groupby(["d_model", "n_blocks", "tokens"]):
        dense, moe = at[at.ffn == "dense"], at[at.ffn == "moe"]
        if dense.empty or moe.empty:
            continue
        best = moe.loc[moe[o.loss].idxmin()]
        g1 = moe[moe.granularity == 1]
        dl = float(dense[o.loss].iloc[0])
        size = done[(done.ffn == "dense") & (done.d_model == d) & (done.n_blocks == n)]
        at_f = dense_loss_at(float(best.flops), size.flops, size[o.loss])
        rows.append(
            [
                f"{int(d)}×{int(n)}",
                count(D),
                _num(dl),
                _num(float(g1[o.loss].iloc[0])) if not g1.empty else "–",
                int(best.granularity),
                _num(float(best[o.loss])),
                _num(float(best[o.loss]) - dl, "+.4f"),
                _num(float(best.flops) / float(dense.flops.iloc[0]), ".3f"),
                _num(at_f) if at_f is not None else "–",
                _num(float(best[o.loss]) - at_f, "+.4f") if at_f is not None else "–",
            ]
        )
    loss_vs_flops(done, out / "loss_vs_flops.png", o.loss)
    text = ["![loss vs FLOPs](loss_vs_flops.png)", ""]
    if rows:
        text.append(
            "Same size and tokens: MoE adds expert parameters at (almost) the dense model's FLOPs; 'FLOPs "
            "ratio' is the best MoE's FLOPs ÷ dense FLOPs (router cost 14·E·G/(72·d)). For equal compute, "
            "'dense @ MoE FLOPs' is the same size's dense loss at the best MoE's FLOPs, linear in log FLOPs "
            "through that size's dense runs; a negative last column means the MoE wins at equal FLOPs.\n"
        )
        text.append(
            _table(
                [
                    "d×blocks",
                    "D",
                    "dense",
                    "MoE G=1",
                    "best G",
                    "best MoE",
                    "best − dense",
                    "FLOPs ratio",
                    "dense @ MoE FLOPs",
                    "best − that",
                ],
                rows,
            )
        )
    return "\n".join(text)


def iso_runs(done, loss: str):
    """The finished runs of an iso-FLOP sweep (those with a budget) for finemoe.scaling.isoflop."""
    from finemoe.scaling.isoflop import IsoRuns
    from finemoe.scaling.runs import run_groups

    if "budget" not in done.columns:
        return IsoRuns(*(np.array([]) for _ in range(5)))
    iso = done[done.budget.notna()]
    g = iso.granularity.where(iso.ffn == "moe", 0).astype(int)
    return IsoRuns(
        iso.budget.astype(float).to_numpy(),
        iso.active_params.astype(float).to_numpy(),
        g.to_numpy(),
        iso[loss].astype(float).to_numpy(),
        run_groups(iso.to_dict("records")),
    )


def _isoflop_section(done, out: Path, o: ReportOptions, E: int) -> str | None:
    """Chinchilla approach 2 per G; None when the runs have no compute budgets."""
    from finemoe.report.run_plots import isoflop_curves
    from finemoe.scaling import isoflop as I
    from finemoe.scaling import plan as P
    from finemoe.scaling.laws import load_coefficients

    runs = iso_runs(done, o.loss)
    if len(runs.loss) == 0:
        return None
    try:
        res = I.analyse(runs, bootstrap=max(o.bootstrap, 0))
    except DataError as e:
        return f"Iso-FLOP curves not drawn: {e}."
    isoflop_curves(runs, res, out / "isoflop.png", o.loss)
    gs = tuple(sorted({int(g) for g in runs.granularity if g > 0}))
    paper, s = load_coefficients("paper"), P.Settings(expansion_rate=E, granularities=gs or (1,))
    boot = res["bootstrap"]
    rows = []
    for F in res["budgets"]:
        for opt in [x for x in res["optima"] if x["budget"] == F]:
            band = boot["curves"][f"{F:.4g}/G{opt['granularity']}"]
            ci = band["active_params"]
            rows.append(
                [
                    f"{F:.3g}",
                    "dense" if opt["granularity"] == 0 else opt["granularity"],
                    count(opt["active_params"])
                    + ("" if opt["inside"] else f" (edge: the vertex lies {opt['beyond']} the sizes run)"),
                    f"{count(ci['p10'])}–{count(ci['p90'])}" if ci else "–",
                    _num(opt["loss"]),
                    f"{band['n_draws']}/{boot['n']}",
                ]
            )
    text = [
        "Chinchilla's approach 2 per FFN: at each budget, a parabola in ln N_act through the runs' "
        f"{o.loss.replace('_', ' ')}; its minimum is the compute-optimal size and loss. Intervals: p10–p90 "
        "over "
        f"{boot['n']} bootstrap resamples of whole run groups (a stable run with its cooldown branches); a "
        "resample that leaves a curve fewer than 3 sizes has no minimum for it ('draws'). A vertex outside "
        "the sizes run is not extrapolated: the minimum is then the curve at the nearest edge.",
        "",
        "![iso-FLOP curves](isoflop.png)",
        "",
        _table(["budget", "FFN", "optimal N_act", "p10–p90", "loss at the optimum", "draws"], rows),
        "",
    ]
    rows = []
    for F in res["budgets"]:
        b = boot["best_granularity_log2"].get(F) or {}
        share = ", ".join(f"G={g}: {v:.0%}" for g, v in (b.get("share") or {}).items())
        m, mb = res["dense_flops_multiple"][F], boot["dense_flops_multiple"][F]
        try:
            paper_g = f"{P.optimum(paper.moe, F, s).granularity:g}"
        except (FinemoeError, ValueError, ArithmeticError):
            paper_g = "–"
        rows.append(
            [
                f"{F:.3g}",
                res["best_granularity"][F] or "–",
                share or "–",
                f"{m:.2f}×" if m else "–",
                f"{mb['p10']:.2f}–{mb['p90']:.2f}×" if mb else "–",
                paper_g,
            ]
        )
    text += [
        _table(
            [
                "budget",
                "best G",
                "best G across draws",
                "dense FLOPs to match",
                "p10–p90",
                f"paper law's G* (E={E}, G ≤ {max(gs) if gs else 1})",
            ],
            rows,
        ),
        "",
    ]
    text.append(
        _grows_sentence(
            res["grows"],
            "Does the best G grow with compute?",
            "Not answerable from the iso-FLOP optima: fewer than two budgets have an MoE optimum.",
            "the bootstrap draws",
        )
    )
    text.append(
        "'dense FLOPs to match' is the compute the dense optimum needs to reach the best MoE's optimal loss "
        "at that budget (dense optima linear in ln FLOPs across the budgets), over the budget: above 1× the "
        "MoE wins."
    )
    text += ["", _best_run_text(res["best_run"], o.loss), "", _fixed_size_text(res, o.loss)]
    return "\n".join(text)


def _grows_sentence(gr: dict, question: str, unanswerable: str, draws: str) -> str:
    """The answer to `question` from finemoe.scaling.isoflop's growth summary, with its bootstrap share."""
    if gr.get("grows") is None:
        return f"**{question}** {unanswerable}"
    shrinks = gr["best_at_largest"] < gr["best_at_smallest"]
    verdict = "yes" if gr["grows"] else ("no, it shrinks" if shrinks else "no")
    shares = (
        f"It grows in {gr['share_of_draws_growing']:.0%} of {draws} and shrinks in "
        f"{gr['share_of_draws_shrinking']:.0%}."
        if gr["share_of_draws_growing"] is not None
        else "(no bootstrap: no interval)"
    )
    return (
        f"**{question}** {verdict.capitalize()} in these runs: G={gr['best_at_smallest']} at "
        f"{gr['smallest_budget']:.3g} FLOPs, G={gr['best_at_largest']} at {gr['largest_budget']:.3g}. "
        + shares
    )


def _best_run_text(best: dict, loss: str) -> str:
    """Per budget, each FFN's lowest loss over the sizes: no curve, so it answers where parabolas fail."""
    boot = best.get("bootstrap") or {}
    rows = []
    for F in best["budgets"]:
        low, G = best["loss"][F], best["best_granularity"][F]
        gap = best["best_moe_minus_dense"][F]
        band = (boot.get("best_moe_minus_dense") or {}).get(F)
        share = ", ".join(f"G={g}: {v:.0%}" for g, v in ((boot.get("share") or {}).get(F) or {}).items())
        rows.append(
            [
                f"{F:.3g}",
                "–" if 0 not in low else _num(low[0]),
                G or "–",
                "–" if G is None else _num(low[G]),
                "–" if gap is None else f"{gap:+.3f}",
                f"{band['p10']:+.3f} to {band['p90']:+.3f}" if band else "–",
                share or "–",
            ]
        )
    text = [
        "### The best run per budget",
        "",
        f"Each FFN's lowest {loss.replace('_', ' ')} over the sizes run at a budget, with no curve fitted: "
        "it reads the grid where the parabolas above have no minimum, resolving the optimum only to the "
        f"sizes run. Intervals: p10–p90 over {boot.get('n', 0)} resamples of whole sizes (every FFN and "
        "budget of a size together, so MoE and dense stay paired).",
        "",
        _table(
            ["budget", "dense", "best G", "its loss", "best MoE − dense", "p10–p90", "best G across draws"],
            rows,
        ),
        "",
    ]
    text.append(
        _grows_sentence(
            boot.get("grows") or {},
            "Does the best run's G grow with compute?",
            "Not answerable: one budget has MoE runs.",
            "the draws",
        )
    )
    return "\n".join(text)


def _fixed_size_text(res: dict, loss: str) -> str:
    """G compared within each (size, budget): the runs' own losses, no parabola."""
    rows_in = res["at_fixed_size"]
    gs = sorted({g for r in rows_in for g in r["loss"] if g > 0})
    dense = any(0 in r["loss"] for r in rows_in)
    rows = []
    for r in rows_in:
        best = r["best_granularity"]
        rows.append(
            [count(r["active_params"]), f"{r['budget']:.3g}"]
            + (["–" if 0 not in r["loss"] else _num(r["loss"][0])] if dense else [])
            + [
                "–"
                if g not in r["loss"]
                else (f"**{_num(r['loss'][g])}**" if g == best else _num(r["loss"][g]))
                for g in gs
            ]
            + [best or "–", "–" if r["best_moe_minus_dense"] is None else f"{r['best_moe_minus_dense']:+.3f}"]
        )
    text = [
        "### G at a fixed size",
        "",
        f"Each row is one size at one budget: the {loss.replace('_', ' ')} of every FFN, the best MoE in "
        "bold. Every FFN of a size has the same embedding and attention, so this compares G whatever the "
        "compute-optimal size is.",
        "",
        _table(
            ["N_act", "budget"]
            + (["dense"] if dense else [])
            + [f"G={g}" for g in gs]
            + ["best G", "best MoE − dense"],
            rows,
        ),
        "",
    ]
    for t in res["fixed_size_trends"]:
        path = ", ".join(f"G={g} at {F:.3g}" for g, F in zip(t["best_granularity"], t["budgets"]))
        verdict = "grows" if t["grows"] else "shrinks" if t["shrinks"] else "stays"
        text.append(f"- N_act {count(t['active_params'])}: the best G {verdict} ({path}).")
    if not res["fixed_size_trends"]:
        text.append("No size has every G finished at two or more budgets yet.")
    return "\n".join(text)


def fitted_coefficients(moe_res, dense_res, E: int, source: str):
    """The fitted laws as a coefficient set (`finemoe plan --coefficients FILE.json` reads its JSON)."""
    from finemoe.scaling.laws import CoefficientSet

    fits = {"moe": moe_res.to_dict(draws=True)}
    if dense_res is not None:
        fits["dense"] = dense_res.to_dict(draws=True)
    return CoefficientSet(
        "fitted",
        moe_res.model(),
        dense_res.model() if dense_res is not None else None,
        expansion_rate=E,
        source=source,
        extra={"fit": fits},
    )


def _plan_section(fitted, o: ReportOptions) -> str:
    """The planner under the fitted law beside the paper's; a degenerate fit gets no plan, only why."""
    from finemoe.scaling import plan as P
    from finemoe.scaling.laws import load_coefficients
    from finemoe.scaling.trust import coefficient_flags, plan_extrapolation

    sets, withheld = [], ""
    flags = coefficient_flags(fitted) if fitted is not None else {}
    if fitted is not None and any(flags.values()):
        why = "; ".join(f"{law}: {'; '.join(f)}" for law, f in flags.items() if f)
        withheld = (
            f"No plan is drawn from the fitted law: the fit is degenerate ({why}). Borrow the exponents "
            "(`finemoe fit --prior paper`) or add runs at more sizes and token counts.\n\n"
        )
    elif fitted is not None:
        E = fitted.expansion_rate
        sets.append((f"fitted here (E={E})", fitted, P.Settings(expansion_rate=E)))
    paper = load_coefficients(o.paper_coefficients)
    sets.append(
        (
            f"paper `{o.paper_coefficients}` (E={paper.expansion_rate})",
            paper,
            P.Settings(expansion_rate=paper.expansion_rate),
        )
    )
    rows = []
    for F in o.budgets:
        row = [f"{F:.0e}"]
        for _, coeffs, s in sets:
            try:
                c = P.compare(coeffs, F, s)
                row += [
                    f"{c.moe.granularity:g}",
                    count(c.moe.active_params),
                    count(c.moe.tokens),
                    _num(c.moe.loss, ".3f"),
                    _num(c.dense_flops_multiple, ".2f") + "×" if c.dense_flops_multiple else "–",
                ]
                if coeffs is fitted:
                    ext = plan_extrapolation(coeffs, F, c.moe.total_params, c.moe.tokens)
                    row.append(f"{ext['factor']:.3g}×" if ext else "–")
            except (FinemoeError, ValueError, ArithmeticError) as e:
                row += ["–", "–", "–", f"({str(e)[:40]})", "–"] + (["–"] if coeffs is fitted else [])
        rows.append(row)
    header = ["FLOPs"]
    for name, coeffs, _ in sets:
        header += [f"G ({name})", "N_act", "D", "loss", "dense ×"] + (
            ["× largest run"] if coeffs is fitted else []
        )
    note = (
        "Compute-optimal (N, D, G) per budget (d_model = 64·n_blocks, G over powers of two). "
        "'dense ×' is the dense compute needed to reach the MoE optimum's loss. '× largest run' is the "
        "budget over the largest fitted run's FLOPs: past 100× a law fitted on small runs is a guess."
    )
    return withheld + note + "\n\n" + _table(header, rows)


# -- assembly ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    path: Path  # the Markdown file; its PNGs sit beside it
    coefficients: Path | None  # the fitted laws, for `finemoe plan --coefficients`
    flags: dict[str, list[str]]  # per fitted law, why it is degenerate (empty lists: it is not)

    @property
    def degenerate(self) -> bool:
        return any(self.flags.values())


def build_report(results: str | Path, out_dir: str | Path, options: ReportOptions | None = None) -> Report:
    """Write `report.md` and its PNGs into out_dir."""
    from finemoe.sweep.store import load_runs

    o = options or ReportOptions()
    if "/" in o.filename or not o.filename.endswith(".md"):
        raise DataError(f"report name {o.filename!r} must be a plain file name ending in .md")
    df = load_runs(results)
    if df.empty:
        raise DataError(f"{results} holds no runs; run a sweep first")
    if o.loss not in df.columns:
        raise DataError(f"{results} has no column {o.loss!r}; use train_loss or val_loss")
    df = _checked(df, results)
    out = ensure_dir(out_dir, "report folder")
    done = df[(df.status == "done") & df[o.loss].notna()].copy()
    md = [f"# {o.title or 'finemoe sweep report'}", "", _summary(df, str(results)), ""]
    flags: dict[str, list[str]] = {}
    coeff_path = None
    md += [f"> {n}" for n in o.notes]
    md += ["", "## Runs", "", _runs_table(df, o.loss), ""]
    if done.empty:
        md += ["No finished runs yet: nothing to fit."]
    else:
        E = int(done[done.ffn == "moe"].expansion_rate.mode().iloc[0]) if (done.ffn == "moe").any() else 64
        gran, _ = _granularity_section(done, out, o)
        md += ["## Loss vs granularity per (N, D) — Eq. 4: L = g/G^γ + h", "", gran, ""]
        iso = _isoflop_section(done, out, o, E)
        if iso is not None:
            md += ["## Iso-FLOP curves: the best G per compute budget", "", iso, ""]
        md += ["## MoE vs dense at equal compute", "", _equal_flops_section(done, out, o), ""]
        c_note = f" with c fixed at {o.fix_c}" if o.fix_c is not None else ""
        moe_text, moe_res = _moe_section(done, out, o)
        md += [f"## Eq. 9: L = c + (g/G^γ + a)·N^−α + b·D^−β{c_note}", "", moe_text, ""]
        dense_text, dense_res = _dense_section(done, out, o)
        md += [f"## Eq. 1 (dense): L = c + a·N^−α + b·D^−β{c_note}", "", dense_text, ""]
        fitted = None
        flags = {law: r.flags for law, r in (("moe", moe_res), ("dense", dense_res)) if r is not None}
        if moe_res is not None:
            fitted = fitted_coefficients(moe_res, dense_res, E, f"finemoe report {results}")
            coeff_path = out / "coefficients.json"
            write_text_atomic(coeff_path, json.dumps(fitted.to_dict(), indent=2) + "\n")
        md += ["## Planner: fitted law vs the paper's coefficients", "", _plan_section(fitted, o), ""]
    if o.discussion and o.discussion.strip():
        md += ["## Discussion", "", o.discussion.strip(), ""]
    path = out / o.filename
    write_text_atomic(path, "\n".join(md).rstrip() + "\n")
    return Report(path, coeff_path, flags)
