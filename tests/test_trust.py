"""Trust in fitted laws: degenerate-fit flags, run-group bootstrap, extrapolation, plan bands,
--write-config."""

import json

import numpy as np
import pytest
from _train_fixtures import make_data

from finemoe.cli import main
from finemoe.scaling import fit as F
from finemoe.scaling import trust
from finemoe.scaling.laws import load_coefficients

PAPER = load_coefficients("paper")
# What `make quickstart` fitted before this check existed (its report's coefficients.json).
QUICKSTART_FIT = {"g": 0.3, "gamma": 0.5, "a": 3.0, "alpha": 0.2, "b": 1.1e58, "beta": 11.9, "c": 0.47}
MINI_FIT = {"g": 0.646, "gamma": 0.646, "a": 4.30, "alpha": 0.0638, "b": 26.8, "beta": 0.138, "c": 1.6e-12}


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_paper_is_not_flagged_and_the_quickstart_and_mini_fits_are():
    assert trust.fit_flags(vars(PAPER.moe), min_loss=2.0) == []
    assert trust.fit_flags(vars(PAPER.dense), min_loss=2.0) == []
    quick = trust.fit_flags(QUICKSTART_FIT, fixed=["c"], min_loss=4.0)
    assert any("beta=11.9" in f for f in quick) and any("b=1.1e+58" in f for f in quick)
    mini = trust.fit_flags(MINI_FIT, min_loss=4.9)
    assert len(mini) == 1 and "c=1.6e-12 sits at 0" in mini[0] and "alpha=0.0638" in mini[0]
    assert trust.fit_flags(MINI_FIT, fixed=["c"], min_loss=4.9) == []  # a fixed c is the user's choice


def test_a_wide_bootstrap_interval_is_flagged():
    draws = [{**vars(PAPER.moe), "b": b} for b in np.geomspace(1, 1e5, 20)]
    flags = trust.fit_flags(vars(PAPER.moe), bootstrap={"draws": draws})
    assert len(flags) == 1 and flags[0].startswith("bootstrap p10-p90 of b spans")


def _grid(groups_of: int):
    """Paper-law points where each stable run has `groups_of` branches (same N, G; growing D)."""
    N, D, G, grp = [], [], [], []
    for i, n in enumerate((2e6, 4e6, 8e6, 16e6)):
        for g in (1, 2, 4, 8):
            for k in range(groups_of):
                N.append(n), D.append(1e7 * 2**k), G.append(g), grp.append(f"{i}-{g}")
    N, D, G = map(np.array, (N, D, G))
    return F.Points(N, D, G, PAPER.moe.loss(N, D, G), flops=6 * N * D, group=np.array(grp))


def test_the_bootstrap_resamples_whole_run_groups(monkeypatch):
    pts = _grid(3)
    seen = []
    solve = F._solve

    def spy(law, sample, *a, **k):
        seen.append(sample)
        return solve(law, sample, *a, **k)

    monkeypatch.setattr(F, "_solve", spy)
    res = F.fit(pts, "moe", fixed={"c": 0.47}, holdout=None, bootstrap=5)
    samples = seen[1:]  # the first solve is the fit itself
    assert len(samples) == 5 and res.bootstrap["resampled"] == "groups" and res.bootstrap["n_groups"] == 16
    for s in samples:
        labels, counts = np.unique(s.group, return_counts=True)
        assert np.all(counts % 3 == 0)  # every drawn group brings all three of its branches
        assert len(s) == 3 * round(0.8 * 16)
    assert len(res.bootstrap["draws"]) == 5
    assert (
        "draws" not in res.to_dict()["bootstrap"] and len(res.to_dict(draws=True)["bootstrap"]["draws"]) == 5
    )


def test_without_groups_the_bootstrap_resamples_runs():
    pts = _grid(2)
    res = F.fit(F.Points(pts.N, pts.D, pts.G, pts.loss), "moe", fixed={"c": 0.47}, holdout=None, bootstrap=3)
    assert res.bootstrap["resampled"] == "runs" and res.bootstrap["n_groups"] == len(pts)


def test_extrapolation_factor_and_loud_warning():
    data = {
        "max_total_params": 1e7,
        "min_total_params": 1e6,
        "max_tokens": 1e8,
        "min_tokens": 1e7,
        "max_flops": 1e16,
    }
    inside = trust.extrapolation(5e15, 5e6, 5e7, data)
    assert inside["factor"] == 0.5 and inside["warning"] is None and not inside["loud"]
    near = trust.extrapolation(5e16, 5e6, 5e8, data)
    assert (
        near["factor"] == pytest.approx(5)
        and near["warning"].startswith("beyond the fitted runs")
        and not near["loud"]
    )
    far = trust.extrapolation(1e19, 2e8, 1e10, data)
    assert far["factor"] == pytest.approx(1000) and far["loud"] and far["warning"].startswith("EXTRAPOLATION")
    assert "N is 20x" in far["warning"] and "D is 100x" in far["warning"]


def _fit_file(tmp_path, capsys, extra=()):
    """A results CSV from a grid of paper-law runs plus noise, fitted with a bootstrap into FIT.json."""
    rng = np.random.default_rng(0)
    rows = ["run_id,status,ffn,granularity,expansion_rate,total_params,active_params,tokens,flops,train_loss"]
    for n in (2e6, 4e6, 8e6, 16e6):
        for d in (2e7, 8e7):
            for g in (0, 1, 4, 16):
                loss = (
                    PAPER.dense.loss(n, d) if g == 0 else PAPER.moe.loss(n * 8, d, g)
                ) + 0.005 * rng.standard_normal()
                total = n if g == 0 else n * 8
                rows.append(
                    f"r{len(rows)},done,{'dense' if g == 0 else 'moe'},{g},8,{total:.0f},{n:.0f},{d:.0f},"
                    f"{6 * n * d:.3e},{loss:.5f}"
                )
    csv = tmp_path / "runs.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fit.json"
    for law in ("moe", "dense"):
        run_json(
            capsys,
            "fit",
            str(csv),
            "--law",
            law,
            "--bootstrap",
            "12",
            "--holdout-best",
            "0",
            "--out",
            str(out),
            "--budgets",
            "1e18",
            *extra,
        )
    return out


def test_plan_from_a_fit_reports_its_band_and_how_far_it_extrapolates(tmp_path, capsys):
    fit = _fit_file(tmp_path, capsys, extra=("--fix-c", "0.47"))
    doc = json.loads(fit.read_text())
    assert len(doc["fit"]["moe"]["bootstrap"]["draws"]) == 12 and doc["fit"]["moe"]["data"]["max_flops"] > 0
    plan = run_json(capsys, "plan", "--flops", "1e18", "--coefficients", str(fit))
    u = plan["uncertainty"]
    assert {"p10", "p50", "p90"} <= set(u) and u["n_draws"] == 12
    for key in ("granularity", "active_params", "tokens", "loss", "dense_flops_multiple"):
        assert u["p10"][key] <= u["p50"][key] <= u["p90"][key]
    ext = plan["extrapolation"]
    assert ext["factor"] == pytest.approx(1e18 / (6 * 16e6 * 8e7), rel=1e-3) and ext["loud"]
    assert ext["warning"].startswith("EXTRAPOLATION") and capsys.readouterr().err == ""
    assert main(["plan", "--flops", "1e18", "--coefficients", str(fit), "--json"]) == 0
    assert "WARNING: EXTRAPOLATION" in capsys.readouterr().err  # loud even when stdout is JSON
    paper = run_json(capsys, "plan", "--flops", "1e18")
    assert paper["extrapolation"] is None and paper["uncertainty"] is None and not paper["degenerate"]


def test_plan_flags_a_degenerate_fit_in_json_and_words(tmp_path, capsys):
    doc = {"name": "quick", "expansion_rate": 8, "moe": QUICKSTART_FIT}
    path = tmp_path / "quick.json"
    path.write_text(json.dumps(doc))
    plan = run_json(capsys, "plan", "--flops", "1e16", "--coefficients", str(path))
    assert plan["degenerate"] and any("beta=11.9" in f for f in plan["flags"]["moe"])
    assert main(["plan", "--flops", "1e16", "--coefficients", str(path)]) == 0
    assert capsys.readouterr().out.startswith("DEGENERATE moe FIT")


def test_fan_chart_over_budgets(tmp_path, capsys):
    import matplotlib.image

    fit = _fit_file(tmp_path, capsys, extra=("--fix-c", "0.47"))
    png = tmp_path / "fan.png"
    assert main(["plan", "--flops", "1e18", "--coefficients", str(fit), "--plot", str(png), "--json"]) == 0
    img = matplotlib.image.imread(png)
    assert img.shape[1] > 3 * img.shape[0]  # four panels side by side


def test_prior_paper_fixes_the_exponents(tmp_path, capsys):
    fit = _fit_file(tmp_path, capsys, extra=("--prior", "paper"))
    doc = json.loads(fit.read_text())
    assert doc["moe"]["gamma"] == 0.58 and doc["moe"]["alpha"] == 0.115 and doc["moe"]["beta"] == 0.147
    assert sorted(doc["fit"]["moe"]["fixed"]) == ["alpha", "beta", "gamma"]
    assert sorted(doc["fit"]["dense"]["fixed"]) == ["alpha", "beta"]


@pytest.mark.parametrize("bad", ["alpha", "alpha=", "alpha=-1", "alpha=nan", "=3"])
def test_fix_needs_name_equals_a_positive_value(tmp_path, capsys, bad):
    csv = tmp_path / "r.csv"
    csv.write_text("total_params,tokens,granularity,train_loss\n1,2,1,3\n")
    assert main(["fit", str(csv), "--fix", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fix" in err[0] and "NAME=VALUE" in err[0]


def test_write_config_trains(tmp_path, capsys):
    cfg = tmp_path / "planned.yaml"
    plan = run_json(capsys, "plan", "--flops", "1e15", "--expansion-rate", "8", "--write-config", str(cfg))
    a = plan["architecture"]
    from finemoe.train.config import TrainConfig

    written = TrainConfig.from_yaml(cfg)
    assert (written.model.d_model, written.model.n_blocks, written.model.granularity) == (
        a["d_model"],
        a["n_blocks"],
        a["granularity"],
    )
    assert written.tokens == a["tokens"] and written.model.expansion_rate == 8
    data = make_data(tmp_path / "data", vocab=64)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(cfg),
                f"data_dir={data}",
                f"out_dir={out}",
                "tokens=1024",
                "batch_size=8",
                "model.seq_len=16",
                "eval_batches=1",
                "--quiet",
            ]
        )
        == 0
    )
    record = json.loads((out / "final.json").read_text())
    assert record["status"] == "done" and record["d_model"] == a["d_model"]


def test_fit_reads_several_tables_and_holds_out_the_largest_budget(tmp_path, capsys):
    rng = np.random.default_rng(1)
    head = "run_id,status,ffn,granularity,expansion_rate,total_params,tokens,flops,train_loss"
    old, new = [head], [head + ",budget,parent"]
    for n in (2e6, 4e6, 8e6):
        for g in (1, 4):
            for d in (1e7, 3e7):
                loss = PAPER.moe.loss(n, d, g) + 0.002 * rng.standard_normal()
                old.append(f"o{len(old)},done,moe,{g},8,{n:.0f},{d:.0f},{6 * n * d / 8:.4g},{loss:.5f}")
            for budget in (1e15, 1e16):
                d = budget / (6 * n / 8)
                loss = PAPER.moe.loss(n, d, g) + 0.002 * rng.standard_normal()
                new.append(
                    f"n{len(new)},done,moe,{g},8,{n:.0f},{d:.0f},{budget:.4g},{loss:.5f},{budget:.4g},"
                )
    (tmp_path / "old.csv").write_text("\n".join(old) + "\n")
    (tmp_path / "new.csv").write_text("\n".join(new) + "\n")
    res = run_json(
        capsys,
        "fit",
        str(tmp_path / "old.csv"),
        str(tmp_path / "new.csv"),
        "--holdout-budget",
        "--fix-c",
        "0.47",
    )
    assert (
        res["n_points"] == 12 + 12
        and res["holdout"]["held_out"] == "given"
        and res["holdout"]["n_heldout"] == 6
    )
    assert res["holdout"]["rmse"] < 0.05
    assert main(["fit", str(tmp_path / "old.csv"), "--holdout-budget"]) == 2
    assert "needs an iso-FLOP sweep" in capsys.readouterr().err


def test_the_report_flags_the_mini_fit_and_draws_no_plan_from_it(tmp_path, capsys):
    from pathlib import Path

    mini = Path(__file__).resolve().parents[1] / "experiments" / "mini" / "results.csv"
    out = run_json(capsys, "report", str(mini), "--out", str(tmp_path), "--bootstrap", "0")
    assert out["degenerate"] and "c=" in out["flags"]["moe"][0] and "sits at 0" in out["flags"]["moe"][0]
    md = (tmp_path / "report.md").read_text()
    assert "No plan is drawn from the fitted law: the fit is degenerate" in md and "fitted here" not in md
    assert "fixed at the paper's (`fit --prior paper`)" in md  # held-out RMSE with and without the prior
    coeffs = json.loads((tmp_path / "coefficients.json").read_text())
    assert coeffs["fit"]["moe"]["degenerate"] and coeffs["fit"]["moe"]["flags"] == out["flags"]["moe"]


def test_without_flops_the_factor_is_the_plans_n_times_d_over_the_largest_runs():
    data = trust.data_range(np.array([1e7, 1e6]), np.array([1e7, 1e8]))
    ext = trust.extrapolation(0, 1e7, 1e8, data)  # 10x the largest run's N·D (1e14), though N and D are seen
    assert ext["factor"] == pytest.approx(10) and ext["warning"].startswith("beyond the fitted runs")
