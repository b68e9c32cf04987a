"""Iso-FLOP analysis (approach 2): parabola optima, best G per budget, dense multiple, group bootstrap."""

import numpy as np
import pytest

from finemoe import accounting as acc
from finemoe.errors import DataError
from finemoe.scaling import isoflop as I
from finemoe.scaling.laws import load_coefficients

PAPER = load_coefficients("paper")
E = 8


def synthetic(budgets=(1e12, 1e13, 1e14), noise=0.0, seed=0) -> I.IsoRuns:
    """Runs of the paper's laws at E = 8: at each budget, 7 sizes around the dense optimum, G in 1..16 and
    dense. The planner puts G* at 8 for 1e12 and 1e13 FLOPs and at 16 for 1e14."""
    rng = np.random.default_rng(seed)
    rows = []
    for F in budgets:
        n_mid = (F / 120) ** 0.5  # D = 20 N
        for k, n_act in enumerate(n_mid * 2.0 ** np.arange(-3, 4)):
            d = (n_act / 12 * 64) ** (1 / 3)  # d = 64 n, N_act = 12 d^2 n
            n = d / 64
            for G in (0, 1, 2, 4, 8, 16):
                if G == 0:
                    D = F / acc.flops_per_token(d, n)
                    loss = PAPER.dense.loss(n_act, D)
                else:
                    D = F / acc.flops_per_token(d, n, E, G)
                    loss = PAPER.moe.loss(acc.total_params(d, n, E), D, G)
                rows.append((F, n_act, G, loss + noise * rng.standard_normal(), f"{k}-{G}"))
    F, N, G, L, grp = map(np.array, zip(*rows))
    return I.IsoRuns(F, N, G, L, grp)


def test_parabola_recovers_a_known_minimum_and_says_when_it_is_outside():
    x = np.exp(np.linspace(0, 4, 5))
    o = I.parabola_optimum(x, 2 + 0.1 * (np.log(x) - 2.5) ** 2)
    assert o.active_params == pytest.approx(np.exp(2.5)) and o.loss == pytest.approx(2) and o.inside
    edge = I.parabola_optimum(x, 2 + 0.1 * (np.log(x) - 6) ** 2)  # vertex at e^6, past the largest size
    assert not edge.inside and edge.beyond == "above"
    assert edge.active_params == pytest.approx(np.exp(4)) and edge.loss == pytest.approx(2 + 0.1 * 4)
    low = I.parabola_optimum(x, 2 + 0.1 * (np.log(x) + 1) ** 2)
    assert low.beyond == "below" and low.active_params == pytest.approx(1) and low.loss == pytest.approx(2.1)
    assert I.parabola_optimum(x[:2], [1, 2]) is None  # two sizes: no curve
    assert I.parabola_optimum(x, -((np.log(x) - 2) ** 2)) is None  # a maximum, not a minimum


def test_on_the_paper_law_the_best_g_grows_and_moe_beats_dense():
    res = I.analyse(synthetic(), bootstrap=20)
    best = [res["best_granularity"][F] for F in res["budgets"]]
    assert best == sorted(best) and best[-1] > best[0]
    assert all(m > 1 for m in res["dense_flops_multiple"].values())
    assert all(o["inside"] for o in res["optima"])
    assert res["grows"]["grows"] is True and res["grows"]["share_of_draws_growing"] > 0.5
    best = res["best_run"]  # the model-free reading agrees on the paper's law
    assert best["bootstrap"]["grows"]["grows"] is True and best["bootstrap"]["n"] == 20
    assert all(gap < 0 for gap in best["best_moe_minus_dense"].values())  # the MoE wins on that law
    band = res["bootstrap"]["dense_flops_multiple"][1e13]
    assert band["p10"] <= band["p50"] <= band["p90"]


def test_g_is_compared_within_each_size_and_its_trend_read_across_budgets():
    # one size at two budgets: G=2 best at the small one, G=8 at the large one; dense best at both
    F = np.array([1e11] * 4 + [1e12] * 4)
    G = np.array([0, 2, 8, 16] * 2)
    L = np.array([5.0, 5.1, 5.2, 5.3, 4.0, 4.3, 4.1, 4.2])
    rows = I.at_fixed_size(I.IsoRuns(F, np.full(8, 1e5), G, L, np.arange(8)))
    assert [r["best_granularity"] for r in rows] == [2, 8]
    assert [r["best_moe_minus_dense"] for r in rows] == pytest.approx([0.1, 0.1])
    (trend,) = I.fixed_size_trends(rows, min_granularities=3)
    assert trend["best_granularity"] == [2, 8] and trend["grows"] and not trend["shrinks"]
    assert I.fixed_size_trends(rows, min_granularities=4) == []  # a budget short of G: no trend


def test_one_budget_cannot_say_whether_g_grows():
    runs = synthetic(budgets=(1e13,))
    grows = I.analyse(runs, bootstrap=3)["grows"]
    assert grows["grows"] is None and grows["share_of_draws_growing"] is None


def test_whether_g_grows_is_read_between_budgets_with_an_moe_optimum():
    runs = synthetic()
    dense_only_at_smallest = ~((runs.budget == 1e12) & (runs.granularity > 0))
    grows = I.analyse(runs.take(np.flatnonzero(dense_only_at_smallest)), bootstrap=3)["grows"]
    assert grows["smallest_budget"] == 1e13 and grows["largest_budget"] == 1e14 and grows["grows"] is True


def test_the_best_run_per_budget_needs_no_curve_and_resamples_whole_sizes():
    # two budgets, two sizes each; loss falls towards the small size, so no parabola would help
    F = np.repeat([1e11, 1e12], 6)
    N = np.tile(np.repeat([1e4, 1e5], 3), 2)
    G = np.tile([0, 1, 8], 4)
    L = np.array([5.0, 5.1, 5.2, 5.5, 5.6, 5.55, 4.0, 4.2, 4.1, 4.5, 4.7, 4.6])
    best = I.best_runs(I.IsoRuns(F, N, G, L, np.arange(12)))
    assert best["best_granularity"] == {1e11: 1, 1e12: 8}
    assert best["best_moe_minus_dense"] == pytest.approx({1e11: 0.1, 1e12: 0.1})
    assert best["loss"][1e11] == {0: 5.0, 1: 5.1, 8: 5.2}


def test_seeds_of_one_run_are_averaged_at_a_fixed_size():
    F, G = np.full(4, 1e11), np.array([4, 4, 8, 0])
    rows = I.at_fixed_size(I.IsoRuns(F, np.full(4, 1e5), G, np.array([5.0, 5.2, 5.05, 5.0]), np.arange(4)))
    assert rows[0]["loss"] == pytest.approx({4: 5.1, 8: 5.05, 0: 5.0}) and rows[0]["best_granularity"] == 8


def test_the_bootstrap_draws_whole_groups(monkeypatch):
    runs = synthetic()
    sizes = {g: int((runs.group == g).sum()) for g in set(runs.group)}
    assert set(sizes.values()) == {
        3
    }  # a (size, FFN) at each of three budgets: one stable run and two branches
    drawn = []
    take = I.IsoRuns.take

    def spy(self, idx):
        drawn.append((self.group[idx], self.active_params[idx]))
        return take(self, idx)

    monkeypatch.setattr(I.IsoRuns, "take", spy)
    I.analyse(runs, bootstrap=4)
    assert len(drawn) == 8  # per draw: run groups for the curves, then whole sizes for the best runs
    for groups, _ in drawn[::2]:
        labels, counts = np.unique(groups, return_counts=True)
        assert np.all(counts % 3 == 0) and len(groups) == len(runs.group)
    per_size = len(runs.group) // len(np.unique(runs.active_params))
    for _, sizes in drawn[1::2]:
        labels, counts = np.unique(sizes, return_counts=True)
        assert np.all(counts % per_size == 0)


def test_noise_widens_the_bands():
    quiet = I.analyse(synthetic(noise=0.0), bootstrap=30)["bootstrap"]["curves"]["1e+13/G0"]["loss"]
    noisy = I.analyse(synthetic(noise=0.02), bootstrap=30)["bootstrap"]["curves"]["1e+13/G0"]["loss"]
    assert noisy["p90"] - noisy["p10"] > quiet["p90"] - quiet["p10"]


def test_without_three_sizes_there_is_nothing_to_analyse():
    runs = synthetic()
    few = runs.take(np.flatnonzero(np.isin(runs.group, ["0-0", "1-0", "0-1", "1-1"])))
    with pytest.raises(DataError, match="3 or more sizes"):
        I.analyse(few, bootstrap=0)


def test_report_draws_iso_flop_curves_and_answers_the_question(tmp_path):
    import csv

    from finemoe.cli import main

    runs = synthetic(noise=0.003)
    path = tmp_path / "iso.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "run_id",
                "status",
                "ffn",
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
                "budget",
                "parent",
                "wall_time_s",
            ]
        )
        for F, n, G, L, grp in zip(runs.budget, runs.active_params, runs.granularity, runs.loss, runs.group):
            d = round((n / 12 * 64) ** (1 / 3))
            total = n if G == 0 else acc.total_params(d, d / 64, E)
            parent = "" if F == 1e14 else f"{grp}-1e14"  # the largest budget's run is each group's stable run
            w.writerow(
                [
                    f"{grp}-{F:.0e}" if parent else f"{grp}-1e14",
                    "done",
                    "dense" if G == 0 else "moe",
                    G,
                    E,
                    d,
                    1,
                    total,
                    n,
                    F / (6 * n),
                    F,
                    L,
                    L + 0.01,
                    F,
                    parent,
                    1.0,
                ]
            )
    out = tmp_path / "rep"
    assert main(["report", str(path), "--out", str(out), "--bootstrap", "20"]) == 0
    md = (out / "report.md").read_text()
    assert (
        "## Iso-FLOP curves: the best G per compute budget" in md and "![iso-FLOP curves](isoflop.png)" in md
    )
    assert (
        "**Does the best G grow with compute?** Yes in these runs: G=8 at 1e+12 FLOPs, G=16 at 1e+14." in md
    )
    assert "### G at a fixed size" in md and "best MoE − dense" in md
    assert "No size has every G finished at two or more budgets yet." in md  # each budget has its own sizes
    assert (out / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # its content: tests/test_plots.py
    assert main(["report", str(path), "--out", str(tmp_path / "nb"), "--bootstrap", "0"]) == 0
    assert "(no bootstrap: no interval)" in (tmp_path / "nb" / "report.md").read_text()
