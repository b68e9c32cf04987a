"""`finemoe quickstart`: data → sweep → fits → plan → report, and a second run reuses all of it."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from finemoe.cli import main
from finemoe.data.tokens import write_tokens
from finemoe.sweep import spec as specmod

TESTS = Path(__file__).resolve().parent


def _user_data(d: Path) -> None:
    rng = np.random.default_rng(0)
    write_tokens(d / "train.bin", rng.integers(0, 64, 4096), 64)
    write_tokens(d / "val.bin", rng.integers(0, 64, 512), 64)


def _fake_sweep(tmp_path, monkeypatch, **grid) -> dict:
    """A quickstart spec on the test double of the trainer, run in tmp_path with tiny prepared tokens."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(TESTS))
    _user_data(tmp_path / "data")
    return {
        "name": "qs",
        "data_dir": "data",
        "runs_dir": "runs/qs",
        "trainer": "sweep_fake_trainer:fake_train",
        "model": {"vocab_size": 64, "seq_len": 8, "expansion_rate": 4},
        "executor": {"kind": "inprocess"},
        **grid,
    }


def test_user_prepared_tokens_are_used_as_they_are(tmp_path, monkeypatch):
    from finemoe.commands.quickstart import prepare_data

    _user_data(tmp_path / "d")
    monkeypatch.setitem(__import__("sys").modules, "finemoe.data.prepare", None)  # no builder needed
    prepare_data(str(tmp_path / "d"), print)
    from finemoe.errors import DataError

    with pytest.raises(DataError, match="no train.bin"):
        prepare_data(str(tmp_path / "empty"), print)


def test_quickstart_runs_everything_then_reuses_it(tmp_path, monkeypatch, capsys):
    spec = _fake_sweep(
        tmp_path,
        monkeypatch,
        sizes=[{"d_model": 64, "n_blocks": 1}, {"d_model": 128, "n_blocks": 1}],
        granularities=[1, 2, 4],
        tokens=[1000, 4000],
        dense=True,
    )
    (tmp_path / "qs.yaml").write_text(yaml.safe_dump(spec))
    assert main(["quickstart", "--spec", "qs.yaml", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "report:  runs/qs/report/report.md" in out
    md = Path("runs/qs/report/report.md").read_text()
    assert "finemoe quickstart (qs)" in md and "16 done" in md and "with c fixed at 0.47" in md
    starts = {
        r.run_id: Path(r.config["out_dir"], "starts.log").read_text() for r in specmod.load("qs.yaml").runs
    }
    assert main(["quickstart", "--spec", "qs.yaml", "--bootstrap", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["done"] == 16 and res["to_run"] == 0 and res["report"] == "runs/qs/report/report.md"
    again = {
        r.run_id: Path(r.config["out_dir"], "starts.log").read_text() for r in specmod.load("qs.yaml").runs
    }
    assert again == starts  # nothing trained twice


@pytest.mark.slow
def test_real_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    """The real thing: corpus from the registries, the built-in sweep on the real trainer (~10 min on 2
    cores)."""
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart"]) == 0
    assert "report:" in capsys.readouterr().out
    assert Path("runs/quickstart/report/report.md").is_file()
    assert main(["quickstart", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["to_run"] == 0


@pytest.mark.parametrize(
    "flags", [{"moe": ["exponent beta=11.9 is outside [0.01, 2]"], "dense": []}, {"moe": [], "dense": []}]
)
def test_quickstart_recommends_a_plan_only_from_an_unflagged_fit(tmp_path, monkeypatch, capsys, flags):
    from finemoe.report import report as R

    spec = _fake_sweep(
        tmp_path, monkeypatch, sizes=[{"d_model": 64, "n_blocks": 1}], granularities=[1, 2], tokens=[1000]
    )
    (tmp_path / "qs.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(R, "build_report", lambda *a, **k: R.Report(Path("r.md"), Path("c.json"), flags))
    assert main(["quickstart", "--spec", "qs.yaml", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    if flags["moe"]:
        assert "the moe fit is degenerate (exponent beta=11.9" in out and "no plan is recommended" in out
        assert "--coefficients c.json" not in out
    else:
        assert "plan with the fitted law: finemoe plan --flops 1e18 --coefficients c.json" in out
        assert "degenerate" not in out
