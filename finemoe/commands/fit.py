"""`finemoe fit`: fit Eq. 9 (MoE), Eq. 1 (dense) or Eq. 4 (per-(N, D) granularity) to a run table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finemoe.commands.common import (
    add_json_flag,
    check_outputs,
    emit,
    nonnegative_int,
    positive_float,
    positive_int,
)

PRIORS = ("paper", "paper-precise")


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit a scaling law to finished runs (CSV or the sweep's SQLite store)")
    p.add_argument(
        "results",
        metavar="RESULTS",
        nargs="+",
        help="runs CSV or SQLite store with a `runs` table; several are fitted as one",
    )
    p.add_argument(
        "--law",
        choices=("moe", "dense", "granularity"),
        default="moe",
        help="moe: Eq. 9 (default); dense: Eq. 1; granularity: Eq. 4 per (N, D)",
    )
    p.add_argument(
        "--loss-column",
        choices=("train_loss", "val_loss"),
        default="train_loss",
        help="fit target (the paper fits the final smoothed training loss)",
    )
    p.add_argument(
        "--fix-c",
        type=positive_float,
        default=None,
        metavar="VALUE",
        help="hold the irreducible loss c fixed (the paper's code: 0.472)",
    )
    p.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hold any coefficient fixed, e.g. --fix alpha=0.115 (repeatable)",
    )
    p.add_argument(
        "--prior",
        choices=PRIORS,
        default=None,
        help="borrow the exponents small runs cannot identify from a published set: "
        "paper fixes gamma, alpha, beta at Table 1's (dense: alpha, beta)",
    )
    p.add_argument("--huber-delta", type=positive_float, default=0.1, help="Huber delta (0.1, the paper's)")
    p.add_argument(
        "--space",
        choices=("loss", "log"),
        default="loss",
        help="residuals on the loss (paper) or on log-loss (Chinchilla; use --huber-delta 1e-3)",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        metavar="WD",
        help="add WD*sum|p| over the fitted parameters as the paper's code (its text: 5e-4; default 0)",
    )
    p.add_argument("--starts", type=positive_int, default=8, help="grid starting points polished (default 8)")
    p.add_argument(
        "--holdout-best",
        type=float,
        default=0.2,
        metavar="FRAC",
        help="refit without the best FRAC runs and report their RMSE (0 to skip)",
    )
    p.add_argument(
        "--holdout-budget",
        action="store_true",
        help="hold out the runs at the largest compute budget (an iso-FLOP sweep's) instead of the best",
    )
    p.add_argument("--bootstrap", type=int, default=0, metavar="N", help="bootstrap refits (paper: 100)")
    p.add_argument(
        "--bootstrap-fraction",
        type=positive_float,
        default=0.8,
        help="resample size as a fraction of the runs, with replacement (paper: 0.8)",
    )
    p.add_argument(
        "--budgets",
        type=positive_float,
        nargs="+",
        default=[1e20, 1e22, 1e24],
        metavar="F",
        help="budgets for bootstrap intervals of the optimal G, N, D",
    )
    p.add_argument(
        "--expansion-rate",
        "-E",
        type=positive_int,
        default=None,
        help="E of the runs (default: the results' expansion_rate column, else 64)",
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="bootstrap resampling seed (default 0)")
    p.add_argument(
        "--out",
        metavar="COEFFS.json",
        help="write the coefficients (merged into this file if it already holds the other law)",
    )
    p.add_argument("--plot", metavar="OUT.png", help="predicted vs observed loss (paper Fig. 5a)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _derived(law_name: str, budgets, E):
    from finemoe.scaling import plan as P

    s = P.Settings(expansion_rate=E)
    if law_name == "moe":

        def f(law):
            out = {}
            for F in budgets:
                p = P.optimum(law, F, s)
                out.update(
                    {
                        f"G_opt@{F:.0e}": p.granularity,
                        f"N_opt@{F:.0e}": p.total_params,
                        f"N_act_opt@{F:.0e}": p.active_params,
                        f"D_opt@{F:.0e}": p.tokens,
                    }
                )
            return out
    elif law_name == "dense":

        def f(law):
            out = {}
            for F in budgets:
                p = P.dense_optimum(law, F, s)
                out.update({f"N_opt@{F:.0e}": p.total_params, f"D_opt@{F:.0e}": p.tokens})
            return out
    else:
        return None
    return f


def run(args: argparse.Namespace) -> int:
    from finemoe.errors import ConfigError
    from finemoe.io import write_json_atomic
    from finemoe.scaling.fit import fit
    from finemoe.scaling.runs import load_points

    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if not 0 <= args.holdout_best < 1:
        raise ConfigError(f"--holdout-best must be in [0, 1), got {args.holdout_best}")
    check_outputs(args.out, args.plot)
    fixed = fixed_coefficients(args.law, args.fix, args.prior, args.fix_c)
    if args.law == "granularity" and (args.bootstrap or fixed or args.prior):
        raise ConfigError(
            "--bootstrap, --fix, --fix-c and --prior apply to the moe and dense laws, not to --law "
            "granularity"
        )
    if args.holdout_budget and args.law == "granularity":
        raise ConfigError("--holdout-budget applies to the moe and dense laws, not to --law granularity")
    pts = load_points(args.results, args.law, args.loss_column)
    if args.expansion_rate is None:
        args.expansion_rate = expansion_rate_of(args.results)
    if args.holdout_budget:
        holdout = pts.largest_budget()
    else:
        _check_holdout(args, pts, fixed)
        holdout = args.holdout_best if args.law != "granularity" and args.holdout_best > 0 else None
    res = fit(
        pts,
        args.law,
        fixed=fixed or None,
        huber_delta=args.huber_delta,
        space=args.space,
        weight_decay=args.weight_decay,
        n_polish=args.starts,
        holdout=holdout,
        bootstrap=args.bootstrap,
        bootstrap_fraction=args.bootstrap_fraction,
        seed=args.seed,
        derived=_derived(args.law, args.budgets, args.expansion_rate) if args.bootstrap else None,
    )
    out = {
        "results": ", ".join(args.results),
        "loss_column": args.loss_column,
        "prior": args.prior,
        **res.to_dict(),
    }
    if args.out:
        doc = _merge(Path(args.out), args, res)
        write_json_atomic(args.out, doc)
        out["out"] = args.out
    emit(args, out, _human)
    if args.plot:
        from finemoe.report.plots import fit_figure

        fit_figure(res, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def expansion_rate_of(results) -> int:
    """The E most MoE runs of a results table used (64, the paper's, when the table does not say)."""
    from collections import Counter

    from finemoe.scaling.runs import read_table

    rates = Counter(
        str(r.get("expansion_rate"))
        for path in results
        for r in read_table(path)
        if str(r.get("ffn", "moe")) == "moe"
    )
    for value, _ in rates.most_common():
        try:
            return int(float(value))
        except ValueError:
            continue
    return 64


def fixed_coefficients(
    law: str, pairs: list[str], prior: str | None, fix_c: float | None
) -> dict[str, float]:
    """--prior's exponents, then --fix NAME=VALUE pairs, then --fix-c: the coefficients held fixed."""
    import math

    from finemoe.errors import ConfigError
    from finemoe.scaling.laws import prior_exponents

    fixed: dict[str, float] = {}
    if prior is not None and law in ("moe", "dense"):
        fixed.update(prior_exponents(prior, law))
    for item in pairs:
        name, sep, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"--fix {item!r}: write NAME=VALUE with a positive number, e.g. --fix alpha=0.115"
            )
        fixed[name.strip()] = value
    if fix_c is not None:
        fixed["c"] = fix_c
    return fixed


def _check_holdout(args, pts, fixed) -> None:
    """Too few runs for the default holdout is the user's to decide: say how to turn it off."""
    from finemoe.errors import ConfigError
    from finemoe.scaling.fit import n_free_params

    if args.law == "granularity" or not args.holdout_best:
        return
    kept = len(pts) - round(args.holdout_best * len(pts))
    need = n_free_params(args.law, fixed) + 1
    if kept < need:
        raise ConfigError(
            f"holding out the best {args.holdout_best:.0%} of {len(pts)} runs leaves {kept}, fewer than "
            f"the {need} the {args.law} law needs; pass --holdout-best 0 to fit without a holdout"
        )


def _merge(path: Path, args, res) -> dict:
    """Keep the other law of an existing coefficients file, so `--law moe` then `--law dense` build one
    set."""
    doc: dict = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and ("moe" in old or "dense" in old or "granularity" in old):
                doc = old
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            doc = {}
    doc.update(
        {
            "name": doc.get("name", path.stem),
            "expansion_rate": args.expansion_rate,
            "source": f"finemoe fit {' '.join(Path(r).name for r in args.results)} ({args.loss_column})",
        }
    )
    doc[args.law] = res.groups if args.law == "granularity" else {**res.fixed, **res.params}
    doc.setdefault("fit", {})[args.law] = {k: v for k, v in res.to_dict(draws=True).items() if k != "groups"}
    return doc


def _human(o: dict) -> str:
    lines = [
        f"fit of the {o['law']} law to {o['n_points']} runs of {o['results']} ({o['loss_column']}, "
        f"Huber delta {o['huber_delta']:g} on {o['space']}"
        + (f", weight decay {o['weight_decay']:g}" if o.get("weight_decay") else "")
        + ")"
    ]
    if o["law"] == "granularity":
        lines.append(f"{'N':>10} {'D':>10} {'runs':>5} {'g':>8} {'gamma':>7} {'h':>7} {'rmse':>7}")
        for g in o["groups"]:
            lines.append(
                f"{g['N']:10.3g} {g['D']:10.3g} {g['n_points']:5d} {g['g']:8.4f} {g['gamma']:7.4f} "
                f"{g['h']:7.4f} {g['rmse']:7.4f}"
            )
    else:
        boot = o.get("bootstrap", {}).get("values", {})
        for k, v in o["coefficients"].items():
            fixed = " (fixed)" if k in o["fixed"] else ""
            ci = f"   [{boot[k][0]:.4g}, {boot[k][-1]:.4g}]" if k in boot and not fixed else ""
            lines.append(f"  {k:<6} {v:10.4f}{fixed}{ci}")
    lines.append(f"in-sample RMSE {o['rmse']:.4f}")
    for flag in o.get("flags", []):
        lines.append(f"DEGENERATE FIT: {flag}")
    if o.get("flags"):
        lines.append(
            "  these runs do not identify the law; plans from it are not predictions. Borrow the exponents "
            "(--prior paper) or add runs at more sizes and token counts"
        )
    if "holdout" in o:
        h = o["holdout"]
        which = (
            f"the best {h['n_heldout']} runs ({h['fraction']:.0%})"
            if h["held_out"] == "best"
            else f"the {h['n_heldout']} runs at the largest budget"
        )
        lines.append(f"held-out RMSE {h['rmse']:.4f} on {which}, refit without them")
    if "bootstrap" in o:
        b = o["bootstrap"]
        lines.append(
            f"bootstrap: {b['n']} refits of {b['fraction']:.0%} resamples; percentiles {b['percentiles']}"
        )
        for k, v in b["values"].items():
            if "@" in k:
                lines.append(f"  {k:<16} [{v[0]:.4g}, {v[-1]:.4g}]")
    if "out" in o:
        lines.append(f"wrote {o['out']}")
    return "\n".join(lines)
