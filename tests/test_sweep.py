"""Sweeps: spec expansion, skipping finished runs, recording failures, SIGKILL + restart, executors.

Executor mechanics use `sweep_fake_trainer.fake_train`, a test double of the trainer contract that
checkpoints every step; `test_real_trainer_sweep` runs the project's trainer.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_fake_trainer import expected_loss

from finemoe.cli import main
from finemoe.errors import ConfigError
from finemoe.sweep import spec as specmod
from finemoe.sweep.driver import run_sweep
from finemoe.sweep.store import Store

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FAKE = "sweep_fake_trainer:fake_train"


def _raw(tmp_path, **over):
    raw = {
        "name": "t",
        "data_dir": str(tmp_path / "data"),
        "runs_dir": str(tmp_path / "runs"),
        "model": {"vocab_size": 64, "seq_len": 8, "expansion_rate": 4},
        "sizes": [{"d_model": 64, "n_blocks": 1}],
        "granularities": [1, 2],
        "tokens": [1000, 2000],
        "dense": True,
        "trainer": FAKE,
    }
    raw.update(over)
    return raw


def _write(tmp_path, raw) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _starts(config) -> list[str]:
    return (Path(config["out_dir"]) / "starts.log").read_text().split("\n")[:-1]


# -- spec --------------------------------------------------------------------------------------------


def test_spec_expands_grid_with_stable_distinct_ids(tmp_path):
    s = specmod.expand(
        _raw(
            tmp_path,
            sizes=[{"d_model": 64, "n_blocks": 1}, {"d_model": 128, "n_blocks": 2, "tokens": [3000]}],
            seeds=[0, 1],
        )
    )
    # size 1: 2 budgets x 2 seeds x (dense + 2 G); size 2: 1 budget x 2 seeds x 3
    assert len(s.runs) == 18 and len({r.run_id for r in s.runs}) == 18
    again = specmod.expand(
        _raw(
            tmp_path,
            sizes=[{"d_model": 64, "n_blocks": 1}, {"d_model": 128, "n_blocks": 2, "tokens": [3000]}],
            seeds=[0, 1],
        )
    )
    assert [r.run_id for r in again.runs] == [r.run_id for r in s.runs]
    dense = [r for r in s.runs if r.config["model"]["ffn"] == "dense"]
    assert len(dense) == 6
    assert {r.config["tokens"] for r in s.runs if r.config["model"]["d_model"] == 128} == {3000}
    assert all(Path(r.config["out_dir"]).name == r.run_id for r in s.runs)
    assert s.store == str(Path(tmp_path / "runs" / "results.sqlite"))
    # a changed setting is a different run
    lr = specmod.expand(_raw(tmp_path, train={"lr": 1e-3}))
    assert not {r.run_id for r in lr.runs} & {r.run_id for r in s.runs}
    # the CPU matmul path is not (float rounding only): switching it re-runs nothing
    base = specmod.expand(_raw(tmp_path))
    fast = specmod.expand(_raw(tmp_path, train={"cpu_matmul": "onednn"}))
    assert [r.run_id for r in fast.runs] == [r.run_id for r in base.runs]
    assert all(r.config["cpu_matmul"] == "onednn" for r in fast.runs)


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"bogus": 1}, "unknown key"),
        ({"data_dir": None}, "data_dir"),
        ({"sizes": []}, "sizes"),
        ({"granularities": [3]}, "granularity G=3 must divide"),
        ({"tokens": ["lots"]}, "must be a number"),
        ({"train": {"tokens": 5}}, "set by the sweep"),
        ({"granularities": [], "dense": False}, "nothing to run"),
    ],
)
def test_spec_errors_are_one_line(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        specmod.expand(_raw(tmp_path, **over))
    assert "\n" not in str(e.value)


def test_builtin_and_experiment_specs_load():
    q = specmod.load("quickstart")
    assert q.name == "quickstart" and len(q.runs) >= 12
    assert {r.config["model"].get("granularity") for r in q.runs if r.config["model"]["ffn"] == "moe"} == {
        1,
        2,
        4,
        8,
    }
    mini = specmod.load(ROOT / "experiments" / "mini" / "spec.yaml")
    runs = [r.config for r in mini.runs]
    sizes = {(c["model"]["d_model"], c["model"]["n_blocks"]) for c in runs}
    assert len(runs) >= 30 and len(sizes) >= 3
    for size in sizes:
        at = [c for c in runs if (c["model"]["d_model"], c["model"]["n_blocks"]) == size]
        assert any(c["model"]["ffn"] == "dense" for c in at)
        for g in (1, 2, 4, 8):
            budgets = {
                c["tokens"] for c in at if c["model"]["ffn"] == "moe" and c["model"]["granularity"] == g
            }
            assert len(budgets) >= 2
    assert {c["model"]["expansion_rate"] for c in runs} <= {8, 16}
    assert max(c["tokens"] for c in runs) <= 10_000_000  # the corpus has ~10M train tokens: no repeats


# -- sweeps with the test double -----------------------------------------------------------------------


def test_sweep_records_failures_and_divergence_and_skips_finished(tmp_path):
    raw = _raw(
        tmp_path,
        sizes=[
            {"d_model": 64, "n_blocks": 1},
            {"d_model": 48, "n_blocks": 1, "granularities": [1], "dense": False},
            {"d_model": 40, "n_blocks": 1, "granularities": [1], "dense": False},
        ],
        tokens=[1000],
    )
    s = specmod.expand(raw)
    out = run_sweep(s, executor="inprocess", log=lambda *_: None)
    assert (out["done"], out["failed"], out["diverged"]) == (3, 1, 1)
    st = Store(s.store)
    failed = [r for r in st.rows() if r["status"] == "failed"]
    assert "simulated crash" in failed[0]["error"]
    starts = {r.run_id: _starts(r.config) for r in s.runs}
    # re-run: done and diverged are skipped, the failed one is retried (and fails again)
    out2 = run_sweep(s, executor="inprocess", log=lambda *_: None)
    assert (out2["done"], out2["failed"], out2["diverged"]) == (3, 1, 1)
    for r in s.runs:
        grew = len(_starts(r.config)) - len(starts[r.run_id])
        assert grew == (1 if r.config["model"]["d_model"] == 48 else 0)
    assert st.get(failed[0]["run_id"])["attempts"] == 2


def test_committed_csv_carries_finished_runs_to_a_fresh_checkout(tmp_path):
    csv = tmp_path / "results.csv"
    s = specmod.expand(_raw(tmp_path, csv=str(csv)))
    out = run_sweep(s, executor="inprocess", log=lambda *_: None)
    assert out["done"] == len(s.runs) and csv.is_file()
    before = {r["run_id"]: r["train_loss"] for r in Store(s.store).rows()}
    # a fresh clone has the committed CSV but neither the store nor the run folders
    os.remove(s.store)
    import shutil

    shutil.rmtree(tmp_path / "runs")
    logs = []
    out2 = run_sweep(specmod.expand(_raw(tmp_path, csv=str(csv))), executor="inprocess", log=logs.append)
    assert out2["done"] == len(s.runs) and out2["to_run"] == 0
    assert any(f"took {len(s.runs)} finished runs" in line for line in logs)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("starts.log"))
    after = {r["run_id"]: r["train_loss"] for r in Store(s.store).rows()}
    assert after == pytest.approx(before)


def test_final_json_written_but_not_recorded_is_not_retrained(tmp_path):
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[1], dense=False))
    (run,) = s.runs
    from sweep_fake_trainer import fake_train

    fake_train(run.config, False)  # the trainer finished, then the sweep died before recording
    out = run_sweep(s, executor="inprocess", log=lambda *_: None)
    assert out["done"] == 1 and len(_starts(run.config)) == 1
    assert Store(s.store).get(run.run_id)["train_loss"] == expected_loss(run.config)


def test_sigkilled_sweep_restarts_without_redoing_or_losing_runs(tmp_path):
    """Kill the sweep (SIGKILL) while a run is mid-way; the restart resumes it and skips finished runs."""
    raw = _raw(tmp_path, tokens=[1000], granularities=[1, 2, 4])
    s = specmod.expand(raw)
    spec_path = _write(tmp_path, raw)
    cmd = [
        sys.executable,
        "-m",
        "finemoe",
        "sweep",
        "run",
        str(spec_path),
        "--executor",
        "local",
        "--threads",
        "1",
    ]
    env = _env() | {"FAKE_STEP_S": "0.1"}
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    victim = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and victim is None:
            time.sleep(0.05)
            assert proc.poll() is None, "the sweep exited before it could be killed"
            if not Path(s.store).is_file():
                continue
            rows = Store(s.store).rows()
            if sum(r["status"] == "done" for r in rows) < 2:
                continue
            for r in rows:
                ck = Path(json.loads(r["config"])["out_dir"]) / "ckpt.pt"
                if r["status"] == "running" and ck.is_file() and json.loads(ck.read_text())["step"] >= 2:
                    victim = r
        assert victim is not None, "the sweep never reached a mid-run state"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the worker dies with the sweep (no orphan keeps training)
    worker_pid = int(victim["owner"].rpartition(":")[2])
    for _ in range(100):
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("worker survived the sweep's SIGKILL")
    done_before = {r["run_id"] for r in Store(s.store).rows() if r["status"] == "done"}
    assert Store(s.store).get(victim["run_id"])["status"] == "running"  # owner dead: will resume

    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    st = Store(s.store)
    rows = {row["run_id"]: row for row in st.rows()}
    assert all(row["status"] == "done" for row in rows.values())
    for run in s.runs:
        log = _starts(run.config)
        assert rows[run.run_id]["train_loss"] == expected_loss(run.config)
        if run.run_id in done_before:
            assert log == ["fresh 0"]  # not redone
        elif run.run_id == victim["run_id"]:
            assert log[0] == "fresh 0" and log[1].startswith("resume ") and int(log[1].split()[1]) >= 2
            assert len(log) == 2
        else:
            assert log == ["fresh 0"]
    with sqlite3.connect(st.path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- CLI ---------------------------------------------------------------------------------------------


def test_cli_sweep_run_status_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = _write(tmp_path, _raw(tmp_path, tokens=[1000]))
    assert main(["sweep", "status", str(p), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["counts"] == {"pending": 3}
    assert main(["sweep", "run", str(p), "--executor", "inprocess", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["done"] == 3 and out["to_run"] == 0
    assert main(["sweep", "status", str(p)]) == 0
    text = capsys.readouterr().out
    assert "3 done" in text and "E4G2" in text
    assert main(["sweep", "export", str(p), "--csv", str(tmp_path / "r.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 3
    assert main(["sweep", "run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


# -- the real trainer ------------------------------------------------------------------------------


def test_real_trainer_sweep(tmp_path):
    import numpy as np

    from finemoe.data.tokens import write_tokens

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_tokens(data / "train.bin", rng.integers(0, 64, 20_000), 64)
    write_tokens(data / "val.bin", rng.integers(0, 64, 2_000), 64)
    raw = _raw(
        tmp_path,
        tokens=[2048],
        granularities=[2],
        trainer=None,
        model={"vocab_size": 64, "seq_len": 16, "expansion_rate": 4, "d_model": 64},
        sizes=[{"d_model": 64, "n_blocks": 1}],
        train={"batch_size": 8, "lr": 1e-3, "ckpt_every": 4},
    )
    raw.pop("trainer")
    s = specmod.expand(raw)
    out = run_sweep(s, executor="local", options={"threads": 1}, log=lambda *_: None)
    assert out["done"] == 2, Store(s.store).rows()
    for row in Store(s.store).rows():
        assert row["train_loss"] > 0 and row["tokens"] == 2048 and row["flops"] > 0 and row["device"]
        assert Path(json.loads(row["config"])["out_dir"], "final.json").is_file()


def test_slurm_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[1], dense=False))
    with pytest.raises(ConfigError, match="executor"):
        run_sweep(s, executor="slurm", log=lambda *_: None)
