"""`finemoe report`: Markdown + PNGs from a store; fitted γ recovered from synthetic runs of a known law."""

import json
import math

import numpy as np
import pytest

from finemoe.accounting import active_params, flops_per_token, total_params
from finemoe.cli import main
from finemoe.sweep import spec as specmod
from finemoe.sweep.store import Store

LAW = {"g": 2.0, "gamma": 0.6, "a": 18.0, "alpha": 0.115, "b": 30.0, "beta": 0.147, "c": 0.47}


def _synthetic_store(path, noise=0.003, fail_one=True):
    """The mini-replication grid with losses drawn from Eq. 9 (known coefficients) plus noise."""
    raw = {
        "name": "syn",
        "data_dir": "data",
        "runs_dir": str(path.parent / "runs"),
        "model": {"vocab_size": 256, "seq_len": 16, "expansion_rate": 8},
        "sizes": [
            {"d_model": 64, "n_blocks": 1},
            {"d_model": 128, "n_blocks": 2},
            {"d_model": 192, "n_blocks": 3},
        ],
        "granularities": [1, 2, 4, 8],
        "tokens": [2e5, 3.2e6],
        "dense": True,
    }
    s = specmod.expand(raw)
    st = Store(path)
    st.add(s.runs, "syn")
    rng = np.random.default_rng(0)
    for i, r in enumerate(s.runs):
        m = r.config["model"]
        moe = m["ffn"] == "moe"
        E, G = (m["expansion_rate"], m["granularity"]) if moe else (1, 0)
        N, D = total_params(m["d_model"], m["n_blocks"], E), r.config["tokens"]
        gterm = LAW["g"] * G ** -LAW["gamma"] if moe else LAW["g"]
        loss = (
            LAW["c"]
            + (gterm + LAW["a"]) * N ** -LAW["alpha"]
            + LAW["b"] * D ** -LAW["beta"]
            + rng.normal(0, noise)
        )
        if fail_one and i == 3:
            st.fail(r.run_id, "RuntimeError: out of memory")
            continue
        st.finish(
            r.run_id,
            {
                "status": "done",
                "ffn": m["ffn"],
                "granularity": G,
                "expansion_rate": E,
                "d_model": m["d_model"],
                "n_blocks": m["n_blocks"],
                "total_params": N,
                "active_params": active_params(m["d_model"], m["n_blocks"]),
                "tokens": D,
                "flops": flops_per_token(m["d_model"], m["n_blocks"], E, G) * D,
                "train_loss": float(loss),
                "val_loss": float(loss) + 0.02,
                "wall_time_s": 10.0,
                "device": "cpu:2 threads",
                "steps": 5,
            },
        )
    return s


def test_report_without_finished_runs_lists_runs(tmp_path):
    s = specmod.expand(
        {
            "name": "e",
            "data_dir": "data",
            "runs_dir": str(tmp_path / "runs"),
            "model": {"vocab_size": 64, "seq_len": 8},
            "sizes": [{"d_model": 64, "n_blocks": 1}],
            "granularities": [1],
            "tokens": [1000],
        }
    )
    st = Store(tmp_path / "s.sqlite")
    st.add(s.runs, "e")
    st.fail(s.runs[0].run_id, "Traceback...\nRuntimeError: boom")
    from finemoe.report.report import build_report

    md = build_report(st.path, tmp_path / "rep").path.read_text()
    assert "## Runs" in md and "failed: RuntimeError: boom" in md and "No finished runs yet" in md


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.sqlite")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "x.sqlite"), "--holdout-best", "1.5"]) == 2
    _synthetic_store(tmp_path / "s.sqlite")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "s.sqlite"), "--discussion", str(tmp_path / "nope.md")]) == 2
    err = capsys.readouterr().err
    assert "--discussion" in err and "nope.md" in err and len(err.strip().splitlines()) == 1
    assert main(["report", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "r"), "--name", "r.txt"]) == 2
    assert "plain file name ending in .md" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any fitting or writing


HAND_MADE = "status,ffn,d_model,n_blocks,total_params,tokens,granularity,expansion_rate,flops,train_loss\n"


@pytest.mark.parametrize(
    "rows, msg",
    [
        ("done,moe,64,2,1e6,1e7,1,8,1e13,4.5\n", None),
        ("done,moe,64,2,lots,1e7,1,8,1e13,4.5\n", "column 'total_params' holds text where numbers belong"),
    ],
)
def test_report_of_a_hand_made_csv(tmp_path, capsys, rows, msg):
    """Only the columns it fits from are required; the summary's and runs table's others may be absent."""
    csv = tmp_path / "mine.csv"
    csv.write_text(
        HAND_MADE + rows + "done,dense,64,2,1e5,1e7,1,1,1e12,5.0\nfailed,moe,64,2,1e6,1e7,2,8,1e13,\n"
    )
    code = main(["report", str(csv), "--out", str(tmp_path / "r")])
    if msg is None:
        assert code == 0
        md = (tmp_path / "r" / "report.md").read_text()
        assert "- runs: 2 done, 1 failed" in md and "| 64×2 | E8 G1 | 1M |" in md
    else:
        assert code == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "r").exists()


def test_report_names_the_missing_columns(tmp_path, capsys):
    csv = tmp_path / "mine.csv"
    csv.write_text("status,ffn,total_params,tokens,granularity,train_loss\ndone,moe,1e6,1e7,1,4.5\n")
    assert main(["report", str(csv), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "lacks column(s) ['expansion_rate', 'd_model', 'n_blocks', 'flops']" in err


def test_report_recovers_known_law_and_writes_figures(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    _synthetic_store(store)
    csv = Store(store).export_csv(tmp_path / "runs.csv")
    out = tmp_path / "rep"
    assert (
        main(
            ["report", str(csv), "--out", str(out), "--bootstrap", "4", "--budgets", "1e18", "1e20", "--json"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    md = (out / "report.md").read_text()
    for section in (
        "## Runs",
        "Eq. 4",
        "## MoE vs dense at equal compute",
        "## Eq. 9",
        "## Eq. 1",
        "## Planner",
    ):
        assert section in md
    assert "failed: RuntimeError: out of memory" in md
    for png in ("loss_vs_granularity.png", "loss_vs_flops.png", "fit_moe.png", "fit_dense.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in md
    assert sorted(res["figures"]) == sorted(str(p) for p in out.glob("*.png"))
    # the fitted law is the one the runs were drawn from, and it loads as plan coefficients
    from finemoe.scaling.laws import load_coefficients

    coeffs = load_coefficients(str(out / "coefficients.json"))
    assert abs(coeffs.moe.gamma - LAW["gamma"]) < 0.15
    assert coeffs.expansion_rate == 8
    assert "held-out best 20%" in md and "bootstrap" in md
    gam = [float(line.split("|")[2]) for line in md.splitlines() if line.startswith("| gamma |")]
    assert gam and math.isclose(gam[0], coeffs.moe.gamma, rel_tol=1e-3)


def test_dense_loss_at_interpolates_in_log_flops():
    from finemoe.report.report import dense_loss_at

    assert dense_loss_at(1e12, [1e12], [5.0]) is None
    assert dense_loss_at(1e13, [1e12, 1e14], [6.0, 4.0]) == pytest.approx(5.0)
    assert dense_loss_at(1e15, [1e14, 1e12], [4.0, 6.0]) == pytest.approx(3.0)  # end segment, any order
    assert dense_loss_at(1e11, [1e12, 1e13, 1e14], [6.0, 5.5, 4.0]) == pytest.approx(6.5)
