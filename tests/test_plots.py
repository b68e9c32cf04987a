import numpy as np

from finemoe.report import plots
from finemoe.scaling import fit as F
from finemoe.scaling.laws import load_coefficients
from finemoe.scaling.plan import Settings

PNG = b"\x89PNG\r\n\x1a\n"
PAPER = load_coefficients("paper")


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 10_000


def test_plan_figure(tmp_path):
    out = tmp_path / "plan.png"
    plots.plan_figure(PAPER, Settings(), [1e21], out)
    assert _is_png(out)


def test_savings_figure(tmp_path):
    out = tmp_path / "savings.png"
    plots.savings_figure(PAPER, Settings(), [1e20, 1e25], out)
    assert _is_png(out)


def test_fit_figure(tmp_path):
    rng = np.random.default_rng(0)
    N = np.repeat([1.35e8, 4.6e8, 1.08e9, 2.1e9], 9)
    D = np.tile(np.repeat([16e9, 33e9, 66e9], 3), 4)
    G = np.tile([1.0, 4.0, 16.0], 12)
    y = PAPER.moe.loss(N, D, G) + 0.01 * rng.standard_normal(len(N))
    res = F.fit(F.Points(N, D, G, y), "moe", fixed={"c": 0.47})
    out = tmp_path / "fit.png"
    plots.fit_figure(res, out)
    assert _is_png(out)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
