import csv
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from finemoe import accounting as acc
from finemoe.cli import main
from finemoe.scaling.laws import load_coefficients

TRUE = load_coefficients("paper-precise")


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_table_precise_acceptance(capsys):
    out = run_json(capsys, "plan", "--paper-table", "--coefficients", "paper-precise")
    rows = out["rows"]
    assert [r["granularity"] for r in rows] == [8, 16, 16, 32, 32, 64, 64]
    for r in rows:
        assert abs(r["tokens_rel_err"]) < 0.015 and abs(r["flops_rel_err"]) < 0.015
        assert abs(r["loss_err"]) < 0.005
        assert r["printed"]["granularity"] == r["granularity"]


def test_paper_table_table1_g_column(capsys):
    out = run_json(capsys, "plan", "--paper-table")
    assert [r["granularity"] for r in out["rows"]] == [8, 16, 16, 32, 32, 64, 64]


def test_plan_json_contract(capsys):
    out = run_json(capsys, "plan", "--flops", "1e20")
    for k in (
        "granularity",
        "active_params",
        "total_params",
        "tokens",
        "loss",
        "flops",
        "architecture",
        "dense",
        "g1",
    ):
        assert k in out
    assert set(out["architecture"]) >= {"d_model", "n_blocks", "n_heads", "n_experts", "expert_width"}
    assert out["granularity"] == 16 and out["flops"] == 1e20
    assert 18 <= out["dense"]["flops_multiple"] <= 24


def test_plan_human_output(capsys):
    assert main(["plan", "--flops", "1e19", "--coefficients", "paper-e16"]) == 0
    text = capsys.readouterr().out
    assert "granularity G" in text and "d_model" in text and "E=16" in text


def test_savings_at_1e20_and_honest_note(capsys):
    out = run_json(capsys, "savings", "--flops", "1e20", "1e25")
    r20, r25 = out["rows"]
    assert 18 <= r20["dense_flops_multiple"] <= 24 and r20["granularity"] == 16
    assert r25["dense_flops_multiple"] == pytest.approx(32, abs=1)
    assert "40x" in out["note"] and "32x" in out["note"]


def _write_runs(tmp_path, fmt="csv", noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for d, n in ((256, 4), (384, 6), (512, 8), (640, 10), (768, 12)):
        for D in (16e9, 33e9, 66e9):
            for G in (1, 2, 4, 8, 16):
                N = acc.total_params(d, n, 64)
                L = float(TRUE.moe.loss(N, D, G)) + noise * rng.standard_normal()
                rows.append(("done", "moe", G, 64, N, acc.active_params(d, n), D, 0.0, L, L + 0.02))
            N = acc.total_params(d, n)
            L = float(TRUE.dense.loss(N, D)) + noise * rng.standard_normal()
            rows.append(("done", "dense", 1, 1, N, N, D, 0.0, L, L + 0.02))
    rows.append(("failed", "moe", 4, 64, 1e9, 1e7, 1e10, 0.0, float("nan"), float("nan")))
    cols = (
        "status",
        "ffn",
        "granularity",
        "expansion_rate",
        "total_params",
        "active_params",
        "tokens",
        "flops",
        "train_loss",
        "val_loss",
    )
    if fmt == "csv":
        path = tmp_path / "runs.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)
    else:
        path = tmp_path / "results.sqlite"
        con = sqlite3.connect(path)
        con.execute(f"CREATE TABLE runs (id INTEGER PRIMARY KEY, {', '.join(cols)})")
        con.executemany(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
        con.commit()
        con.close()
    return path


def test_fit_store_then_plan_with_fitted_coefficients(tmp_path, capsys):
    store = _write_runs(tmp_path, "sqlite")
    coeffs = tmp_path / "coeffs.json"
    moe = run_json(
        capsys,
        "fit",
        str(store),
        "--fix-c",
        "0.472",
        "--out",
        str(coeffs),
        "--bootstrap",
        "3",
        "--budgets",
        "1e20",
    )
    assert moe["n_points"] == 75 and moe["coefficients"]["c"] == 0.472
    assert moe["rmse"] < 0.02 and moe["holdout"]["rmse"] < 0.03
    assert "G_opt@1e+20" in moe["bootstrap"]["values"]
    dense = run_json(
        capsys,
        "fit",
        str(store),
        "--law",
        "dense",
        "--fix-c",
        "0.472",
        "--out",
        str(coeffs),
        "--loss-column",
        "val_loss",
    )
    assert dense["n_points"] == 15 and dense["loss_column"] == "val_loss"
    doc = json.loads(coeffs.read_text())
    assert set(doc) >= {"moe", "dense", "fit"}  # the second fit kept the first one's law
    plan = run_json(capsys, "plan", "--flops", "1e20", "--coefficients", str(coeffs))
    assert plan["dense"] is not None and 8 <= plan["granularity"] <= 32


def test_fit_minimal_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "min.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["total_params", "tokens", "granularity", "train_loss"])
        for N in (1.35e8, 4.6e8, 1.08e9, 2.1e9):
            for D in (16e9, 33e9, 66e9):
                for G in (1, 4, 16):
                    w.writerow([N, D, G, float(TRUE.moe.loss(N, D, G)) + 0.005 * rng.standard_normal()])
    out = run_json(capsys, "fit", str(path), "--fix-c", "0.472")
    assert out["law"] == "moe" and out["n_points"] == 36 and out["rmse"] < 0.01
    gran = run_json(capsys, "fit", str(path), "--law", "granularity")
    assert len(gran["groups"]) == 12


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "finemoe", *argv], capture_output=True, text=True)


@pytest.mark.parametrize(
    "content, msg",
    [
        ("total_params,tokens,train_loss\n1,2,3\n", "missing column(s) ['granularity']"),
        ("total_params,tokens,granularity,train_loss\n" + "1e9,1e10,1,nan\n1e9,2e10,2,3.0\n" * 5, "NaN/inf"),
        ("status,total_params,tokens,granularity,train_loss\nfailed,1e9,1e10,1,3\n", "no finished"),
        (
            "total_params,tokens,granularity,train_loss\n1e9,1e10,four,3\n",
            "column 'granularity' holds 'four', not a number",
        ),
    ],
)
def test_fit_bad_input_one_line_exit_2(tmp_path, content, msg):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    r = _cli("fit", str(p))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert msg in r.stderr


def test_fit_out_under_a_file_exit_2(tmp_path):
    runs = _write_runs(tmp_path, "csv")
    (tmp_path / "blocker").write_text("x")
    r = _cli(
        "fit", str(runs), "--law", "dense", "--fix-c", "0.472", "--out", str(tmp_path / "blocker" / "c.json")
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "blocker is a file; choose another location" in r.stderr


def test_an_os_error_mid_command_is_one_line(monkeypatch, capsys):
    import finemoe.commands.plan as plan_cmd

    def disk_full(args):
        raise OSError(28, "No space left on device", "runs/x/ckpt.pt")

    monkeypatch.setattr(plan_cmd, "run", disk_full)
    assert main(["plan", "--flops", "1e20"]) == 1
    assert capsys.readouterr().err == "finemoe plan: error: runs/x/ckpt.pt: No space left on device\n"


def test_plan_bad_coefficients_exit_2(tmp_path):
    r = _cli("plan", "--flops", "1e20", "--coefficients", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and "not a published set" in r.stderr


def test_scaling_imports_no_torch():
    code = (
        "import sys, finemoe.scaling.plan, finemoe.scaling.fit, finemoe.scaling.runs, finemoe.report.plots, "
        "finemoe.commands.plan, finemoe.commands.savings, finemoe.commands.fit; "
        "from finemoe.cli import main; main(['savings', '--flops', '1e20', '--json']); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
