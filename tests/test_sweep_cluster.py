"""Cluster sweeps: jobs leave their outcome in the run folder and never open the store (SQLite's locking
fails on network filesystems); the driver is its only writer, also for jobs that outlive it."""

import json
import time
from pathlib import Path

import pytest
from _train_fixtures import make_data, tiny_config
from test_sweep import _env, _raw, _starts

from finemoe.sweep import runner
from finemoe.sweep import spec as specmod
from finemoe.sweep.driver import run_sweep, todo
from finemoe.sweep.store import Store

FAKE = "sweep_fake_trainer:fake_train"


def _no_store(*_, **__):
    raise AssertionError("a job opened the store")


def test_a_job_writes_its_run_folder_not_the_store(tmp_path, monkeypatch):
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[2], dense=False))
    config = s.runs[0].config
    monkeypatch.setattr(runner.Store, "__init__", _no_store)
    assert runner.run_job(config, FAKE) == "done"
    out = Path(config["out_dir"])
    assert json.loads((out / "final.json").read_text())["status"] == "done"
    assert not (out / "job.json").exists()  # the heartbeat goes with the job
    assert runner.run_job(config, FAKE) == "done" and _starts(config) == ["fresh 0"]  # not retrained


def test_a_failed_job_leaves_error_json_which_the_driver_records(tmp_path):
    s = specmod.expand(
        _raw(tmp_path, tokens=[1000], granularities=[], sizes=[{"d_model": 48, "n_blocks": 1}])
    )
    run = s.runs[0]
    assert runner.run_job(run.config, FAKE) == "failed"
    err = json.loads((Path(run.config["out_dir"]) / "error.json").read_text())["error"]
    assert "simulated crash" in err
    store = Store(s.store)
    store.add(s.runs, s.name)
    assert runner.collect(store, run.run_id)
    row = store.get(run.run_id)
    assert row["status"] == "failed" and "simulated crash" in row["error"]


def test_submitit_jobs_are_recorded_by_the_driver(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[2]))
    out = run_sweep(s, executor="submitit-local", options={"timeout_min": 5}, log=lambda *_: None)
    assert out["done"] == 2 and out["to_run"] == 0
    for run in s.runs:
        assert (Path(run.config["out_dir"]) / "final.json").is_file()


def test_jobs_that_outlive_their_driver_are_recorded_on_the_next_run(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[2]))
    run_sweep(s, executor="submitit-local", options={"timeout_min": 5, "wait": False}, log=lambda *_: None)
    finals = [Path(r.config["out_dir"]) / "final.json" for r in s.runs]
    deadline = time.time() + 120
    while not all(f.is_file() for f in finals) and time.time() < deadline:
        time.sleep(0.2)
    assert all(f.is_file() for f in finals)
    assert Store(s.store).counts([r.run_id for r in s.runs])["done"] == 0  # the jobs did not write it
    lines = []
    out = run_sweep(s, executor="inprocess", log=lines.append)
    assert out["done"] == 2 and any("recorded 2 runs" in line for line in lines)
    assert all(_starts(r.config) == ["fresh 0"] for r in s.runs)  # recorded, not trained again


def test_a_live_job_keeps_its_run_from_being_submitted_twice(tmp_path):
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[2], dense=False))
    store = Store(s.store)
    store.add(s.runs, s.name)
    run = s.runs[0]
    out = Path(run.config["out_dir"])
    out.mkdir(parents=True)
    beat = {"host": "node7", "pid": 1, "beat_at": time.time()}
    (out / "job.json").write_text(json.dumps(beat))
    assert todo(store, s) == []
    (out / "job.json").write_text(json.dumps({**beat, "beat_at": time.time() - runner.STALE_S - 1}))
    assert todo(store, s) == [run.run_id]  # a stale heartbeat: the job died, the run resumes
    runner.mark_queued(out, "12345")  # submitted, not started: alive for days, not minutes
    (out / "job.json").write_text(
        json.dumps({"queued": "12345", "beat_at": time.time() - runner.STALE_S - 1})
    )
    assert todo(store, s) == []
    (out / "error.json").write_text(json.dumps({"error": "boom"}))  # the job ended
    assert todo(store, s) == [run.run_id]


def test_a_second_job_on_a_run_in_training_steps_aside(tmp_path):
    s = specmod.expand(_raw(tmp_path, tokens=[1000], granularities=[2], dense=False))
    config = s.runs[0].config
    out = Path(config["out_dir"])
    out.mkdir(parents=True)
    (out / "job.json").write_text(json.dumps({"host": "node7", "pid": 99, "beat_at": time.time()}))
    assert runner.run_job(config, FAKE) == "skipped"
    assert not (out / "final.json").exists() and not (out / "starts.log").exists()


def test_a_job_launches_several_processes_through_torchrun(tmp_path):
    """procs_per_run: one run in a job on 2 ranks (gloo here, one per GPU on a cluster)."""
    config = tiny_config(make_data(tmp_path / "data"), tmp_path / "run", steps=4, batch_size=4, threads=1)
    assert runner.run_job(config, procs=2) == "done"
    record = json.loads((tmp_path / "run" / "final.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 4
