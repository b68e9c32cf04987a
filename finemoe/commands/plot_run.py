"""`finemoe plot-run RUN_DIR`: a run's training curves (loss, validation loss, LR, tokens/s) as a PNG."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, check_outputs, emit


def register(sub) -> None:
    p = sub.add_parser("plot-run", help="draw a training run's curves: loss, validation loss, LR, tokens/s")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (out_dir of `finemoe train`)")
    p.add_argument("--out", metavar="OUT.png", help="the figure (default: RUN_DIR/curves.png)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finemoe.errors import DataError
    from finemoe.report.run_plots import training_curves
    from finemoe.train.metrics import METRICS_NAME, read_metrics

    run_dir = Path(args.run_dir)
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise DataError(f"{metrics} not found; give a run folder that `finemoe train` wrote")
    out = args.out or str(run_dir / "curves.png")
    check_outputs(out)
    rows = [r for r in read_metrics(metrics) if "loss" in r and "tokens" in r]
    if not rows:
        raise DataError(f"{metrics} holds no training steps yet; plot it once the run has taken a step")
    training_curves(rows, out, title=run_dir.name)
    emit(args, {"figure": out, "steps": sum("loss" in r for r in rows)}, lambda o: f"wrote {o['figure']}")
    return 0
