"""Figures by their content: panels, axis labels, curves and legends, caught before they are written."""

import numpy as np
import pytest

from finemoe.report import plots, run_plots
from finemoe.scaling import fit as F
from finemoe.scaling.laws import load_coefficients
from finemoe.scaling.plan import Settings

PNG = b"\x89PNG\r\n\x1a\n"
PAPER = load_coefficients("paper")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, as (axes, path) pairs; the PNGs are still written."""
    figures = []
    save = plots.save_figure

    def keep(fig, path):
        figures.append(([(ax.get_xlabel(), ax.get_ylabel(), ax.get_title(), ax) for ax in fig.axes], path))
        return save(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(run_plots, "save_figure", keep)
    return figures


def _legend(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plan_figure(tmp_path, drawn):
    out = tmp_path / "plan.png"
    plots.plan_figure(PAPER, Settings(), [1e21], out)
    ((axes, path),) = drawn
    assert path == out and out.read_bytes()[:8] == PNG
    (xl0, yl0, _, flops_ax), (xl1, yl1, _, iso_ax) = axes
    assert "FLOPs" in xl0 and "loss" in yl0 and xl1 == "granularity G" and "loss" in yl1
    assert "MoE, G=1" in _legend(flops_ax) and any(t.startswith("optimal MoE, G=") for t in _legend(flops_ax))
    assert _legend(iso_ax) == ["1e+19 FLOPs", "1e+21 FLOPs", "1e+23 FLOPs"]  # one curve per budget


def test_savings_figure(tmp_path, drawn):
    plots.savings_figure(PAPER, Settings(), [1e20, 1e25], tmp_path / "savings.png")
    ((axes, _),) = drawn
    assert len(axes) == 2 and axes[1][:2] == (
        "training FLOPs of the optimal MoE",
        "FLOPs multiple to match its loss",
    )
    assert {"dense", "MoE, G=1"} <= set(_legend(axes[1][3]))


def test_fit_figure(tmp_path, drawn):
    rng = np.random.default_rng(0)
    N = np.repeat([1.35e8, 4.6e8, 1.08e9, 2.1e9], 9)
    D = np.tile(np.repeat([16e9, 33e9, 66e9], 3), 4)
    G = np.tile([1.0, 4.0, 16.0], 12)
    y = PAPER.moe.loss(N, D, G) + 0.01 * rng.standard_normal(len(N))
    res = F.fit(F.Points(N, D, G, y), "moe", fixed={"c": 0.47})
    out = tmp_path / "fit.png"
    plots.fit_figure(res, out)
    ((axes, _),) = drawn
    ((xl, yl, _, ax),) = axes
    assert (xl, yl) == ("observed loss", "predicted loss")
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(N)  # one marker per run
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_isoflop_curves(tmp_path, drawn):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_isoflop import synthetic

    from finemoe.scaling import isoflop as I

    runs = synthetic()
    run_plots.isoflop_curves(runs, I.analyse(runs, bootstrap=5), tmp_path / "iso.png")
    ((axes, _),) = drawn
    assert len(axes) == 4  # three budgets and the best G per budget
    assert [a[2] for a in axes[:3]] == [
        f"{F:.3g} FLOPs (★ minimum of the parabola)" for F in (1e12, 1e13, 1e14)
    ]
    assert all(a[0] == "active params N_act" for a in axes[:3])
    assert _legend(axes[0][3]) == ["dense", "G=1", "G=2", "G=4", "G=8", "G=16"]
    assert axes[3][:3] == (
        "compute budget (FLOPs)",
        "best G at the budget",
        "does the best G grow with compute?",
    )


def test_fan_chart(tmp_path, drawn):
    from finemoe.scaling.laws import CoefficientSet

    draws = [{**vars(PAPER.moe), "alpha": a} for a in (0.11, 0.115, 0.12)]
    coeffs = CoefficientSet(
        "drawn", PAPER.moe, PAPER.dense, extra={"fit": {"moe": {"bootstrap": {"draws": draws}}}}
    )
    plots.fan_figure(coeffs, Settings(), 1e20, tmp_path / "fan.png", n=3)
    ((axes, _),) = drawn
    assert [a[1] for a in axes] == ["optimal G", "optimal N_act", "optimal D", "loss at the optimum"]
    assert _legend(axes[0][3]) == ["p10-p90", "p50", "this budget"]


def test_importing_the_report_sets_no_backend():
    import os
    import subprocess
    import sys

    code = (
        "import finemoe.report.report, finemoe.report.plots, finemoe.report.run_plots, matplotlib; "
        "print(matplotlib.get_backend())"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}  # a notebook's or a user's choice stays theirs
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "svg"


def test_plot_run_draws_a_runs_curves(tmp_path, drawn, capsys):
    import json

    from finemoe.cli import main

    run = tmp_path / "run"
    run.mkdir()
    steps = [
        {
            "step": s,
            "tokens": 64 * s,
            "loss": 5 - s / 10,
            "loss_smooth": 5 - s / 12,
            "lr": 1e-3,
            "tokens_per_s": 900.0,
            **({"val_loss": 4.9 - s / 10} if s % 5 == 0 else {}),
        }
        for s in range(1, 11)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps) + '{"step": 11, "tok')
    assert main(["plot-run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"figure": str(run / "curves.png"), "steps": 10}
    ((axes, path),) = drawn
    assert [a[1] for a in axes] == ["loss (nats)", "learning rate", "tokens/s"]
    assert all(a[0] == "tokens seen" for a in axes) and axes[0][2] == "" and path == str(run / "curves.png")
    assert _legend(axes[0][3]) == ["train loss", "train loss, smoothed", "validation loss"]
