"""`finemoe report`: Markdown report (with PNG figures) of a results store or CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from finemoe.commands.common import add_json_flag, emit, positive_float

DEFAULT_RESULTS = "runs/quickstart/results.sqlite"


def register(sub) -> None:
    p = sub.add_parser("report", help="Markdown report with figures: runs, fitted laws, planner answers")
    p.add_argument(
        "results",
        nargs="?",
        default=None,
        help=f"results store (.sqlite), exported CSV, or a sweep spec (default: {DEFAULT_RESULTS})",
    )
    p.add_argument("--out", help="output folder (default: a 'report' folder beside the results)")
    p.add_argument(
        "--loss",
        choices=("train_loss", "val_loss"),
        default="train_loss",
        help="loss to fit (default: the smoothed train loss, as the paper)",
    )
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits for intervals (0: none)")
    p.add_argument(
        "--holdout-best", type=float, default=0.2, help="fraction of best runs held out (paper: 0.2)"
    )
    p.add_argument("--fix-c", type=positive_float, help="fix the irreducible loss c in Eq. 9 and Eq. 1")
    p.add_argument("--budgets", type=positive_float, nargs="+", help="FLOPs budgets for the planner table")
    p.add_argument(
        "--coefficients", default="paper", help="published set to compare against (default: paper)"
    )
    p.add_argument("--title", help="report title")
    p.add_argument("--name", default="report.md", help="Markdown file name inside --out (default report.md)")
    p.add_argument("--note", action="append", default=[], help="a line quoted under the title (repeatable)")
    p.add_argument(
        "--discussion",
        metavar="FILE",
        help="Markdown file with your reading of the results, appended as a 'Discussion' section",
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def resolve_results(arg: str | None) -> Path:
    """A store/CSV path as is; a sweep spec → its store."""
    if arg is None:
        return Path(DEFAULT_RESULTS)
    p = Path(arg)
    if p.suffix in (".yaml", ".yml") or (not p.exists() and p.suffix == ""):
        from finemoe.sweep import spec as specmod

        return Path(specmod.load(arg).store)
    return p


def run(args: argparse.Namespace) -> int:
    from finemoe.errors import ConfigError
    from finemoe.report.report import DEFAULT_BUDGETS, ReportOptions, build_report

    if not 0 < args.holdout_best < 1:
        raise ConfigError(f"--holdout-best must be a fraction in (0, 1), got {args.holdout_best}")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    from finemoe.io import check_folder_path, read_text
    from finemoe.scaling.laws import load_coefficients

    load_coefficients(args.coefficients)  # an unknown set is named before anything is written
    results = resolve_results(args.results)
    discussion = None
    if args.discussion:
        discussion = read_text(args.discussion, "--discussion")
    out = Path(args.out) if args.out else results.parent / "report"
    if not results.is_file():
        from finemoe.errors import DataError

        raise DataError(
            f"results file {results} not found; give a results store (.sqlite) or a CSV exported from one"
        )
    check_folder_path(out, "report folder")
    opts = ReportOptions(
        loss=args.loss,
        bootstrap=args.bootstrap,
        holdout=args.holdout_best,
        fix_c=args.fix_c,
        budgets=tuple(args.budgets or DEFAULT_BUDGETS),
        paper_coefficients=args.coefficients,
        title=args.title,
        notes=list(args.note),
        filename=args.name,
        discussion=discussion,
    )
    rep = build_report(results, out, opts)
    pngs = sorted(str(p) for p in rep.path.parent.glob("*.png"))
    out = {"report": str(rep.path), "figures": pngs, "flags": rep.flags, "degenerate": rep.degenerate}
    emit(
        args,
        out,
        lambda o: "\n".join(
            [f"DEGENERATE {law} FIT: {'; '.join(f)}" for law, f in o["flags"].items() if f]
            + [f"report: {o['report']}"]
        ),
    )
    return 0
