"""Run one sweep entry end to end (the driver runs whole sweeps through an executor).

`execute_run` is what local executors call, in whatever process they use: claim the row, train (resuming
from the run's checkpoint if one exists), record the final record or the error. A result that reached
`final.json` but not the store (killed in between) is recorded without training again.

`run_job` is what a cluster job runs. It never opens the store: SQLite's locking does not work on the
network filesystems where clusters keep their sweeps. The job leaves its outcome in the run's folder
(`final.json`, or `error.json`) and beats a heartbeat file there; the driver, the store's only writer,
collects them (`collect`).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from finemoe.errors import ConfigError, FinemoeError
from finemoe.io import ensure_dir, write_json_atomic
from finemoe.sweep.store import FINAL, Store, owner_id

HEARTBEAT_S = 30.0
STALE_S = 300.0  # a heartbeat older than this belongs to a dead job
QUEUED_S = 7 * 24 * 3600.0  # a job submitted but not started counts as alive this long
DEFAULT_TRAINER = "finemoe.sweep.runner:train_run"
FINAL_NAME, ERROR_NAME, JOB_NAME = "final.json", "error.json", "job.json"


def train_run(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The default trainer entry: the project's trainer on a TrainConfig built from the run's dict."""
    from finemoe.train.config import TrainConfig
    from finemoe.train.trainer import train

    return train(TrainConfig.from_dict(config), resume=resume)


def resolve_trainer(ref: str) -> Callable[[dict[str, Any], bool], dict[str, Any]]:
    """'module:function' → the function; a sweep may name its own (it must take (config, resume))."""
    mod, _, fn = ref.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"trainer {ref!r} cannot be imported ({e}); use 'module:function'") from None


def set_threads(threads: int | None) -> None:
    """Before torch is imported the environment decides its pool size; after, only set_num_threads does."""
    if not threads:
        return
    if "torch" not in sys.modules:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[k] = str(threads)
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # only settable before the first parallel op; harmless if already set


def heartbeat(store: Store, run_ids: list[str], owner: str, stop: threading.Event) -> None:
    """Keep `owner`'s runs marked live in the store until `stop` (a worker its run, the Slurm driver the
    runs its jobs train, since those jobs do not touch the store)."""
    while not stop.wait(HEARTBEAT_S):
        for run_id in run_ids:
            try:
                store.heartbeat(run_id, owner)
            except Exception:  # a busy store must not kill the training
                pass


def execute_run(
    store_path: str, run_id: str, trainer: str = DEFAULT_TRAINER, threads: int | None = None
) -> str:
    """Train one run of the store if nobody else holds it; returns the row's final status or 'skipped'."""
    store = Store(store_path)
    owner = owner_id()
    row = store.claim(run_id, owner)
    if row is None:
        return "skipped"
    config = json.loads(row["config"])
    out_dir = Path(config["out_dir"])
    final = out_dir / "final.json"
    stop = threading.Event()
    beat = threading.Thread(target=heartbeat, args=(store, [run_id], owner, stop), daemon=True)
    beat.start()
    try:
        if final.is_file():
            record = json.loads(final.read_text())
        else:
            set_threads(threads)
            fn = resolve_trainer(trainer)
            record = fn(config, has_checkpoint(out_dir))
        if not isinstance(record, dict):
            raise FinemoeError(f"trainer returned {type(record).__name__}, expected the final-record dict")
        store.finish(run_id, record)
        return record.get("status", "done")
    except KeyboardInterrupt:
        store.fail(run_id, "interrupted (KeyboardInterrupt); re-run the sweep to resume from the checkpoint")
        raise
    except Exception as e:
        msg = str(e) if isinstance(e, FinemoeError) else traceback.format_exc(limit=8)
        store.fail(run_id, f"{type(e).__name__}: {msg}".strip())
        return "failed"
    finally:
        stop.set()


def default_threads(workers: int) -> int:
    """Split the machine's cores between pool workers (2 cores, 1 worker → 2 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def has_checkpoint(out_dir: Path) -> bool:
    """A one-file or a sharded (DCP) checkpoint to resume from (what the trainer resumes)."""
    from finemoe.parallel import dcp
    from finemoe.train.checkpoint import CKPT_NAME, SHARDED_NAME

    return (out_dir / CKPT_NAME).is_file() or dcp.find(out_dir / SHARDED_NAME) is not None


def run_job(
    config: dict[str, Any], trainer: str = DEFAULT_TRAINER, threads: int | None = None, procs: int = 1
) -> str:
    """Train one run inside a cluster job and leave the outcome in its folder; returns the status.

    With procs > 1 the run is launched through torchrun on this node (one process per GPU), with its
    `parallel:` settings; a custom trainer runs in-process only.
    """
    out = Path(config["out_dir"])
    ensure_dir(out, "run folder")
    final = out / FINAL_NAME
    if final.is_file():
        return json.loads(final.read_text()).get("status", "done")
    if _beat(out).get("pid") is not None and job_alive(out):  # another job trains this run now
        return "skipped"
    (out / ERROR_NAME).unlink(missing_ok=True)
    stop = threading.Event()
    beat = threading.Thread(target=_beat_file, args=(out / JOB_NAME, stop), daemon=True)
    beat.start()
    try:
        if procs > 1:
            if trainer != DEFAULT_TRAINER:
                raise ConfigError(f"procs_per_run={procs} launches finemoe's trainer; {trainer} runs alone")
            record = _torchrun(config, procs, threads)
        else:
            set_threads(threads)
            record = resolve_trainer(trainer)(config, has_checkpoint(out))
        if not isinstance(record, dict):
            raise FinemoeError(f"trainer returned {type(record).__name__}, expected the final-record dict")
        status = record.get("status", "done")
        if status not in FINAL:  # not an outcome the store takes: the driver fails it with this reason
            raise FinemoeError(f"trainer returned status {status!r}, expected one of {FINAL}")
        if not final.is_file():
            write_json_atomic(final, record)
        return status
    except Exception as e:
        msg = str(e) if isinstance(e, FinemoeError) else traceback.format_exc(limit=8)
        write_json_atomic(out / ERROR_NAME, {"error": f"{type(e).__name__}: {msg}".strip()})
        return "failed"
    finally:
        stop.set()
        beat.join()
        (out / JOB_NAME).unlink(missing_ok=True)


def _torchrun(config: dict[str, Any], procs: int, threads: int | None) -> dict[str, Any]:
    out = Path(config["out_dir"])
    path = out / "job_config.json"  # YAML reads JSON
    write_json_atomic(path, config)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd += ["-m", "finemoe", "train", str(path), "--quiet", "--json"]
    cmd += ["--resume"] if has_checkpoint(out) else []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise FinemoeError(f"torchrun exited with {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _beat_file(path: Path, stop: threading.Event) -> None:
    while True:
        try:
            write_json_atomic(
                path, {"host": socket.gethostname(), "pid": os.getpid(), "beat_at": time.time()}
            )
        except OSError:
            pass  # a full or flaky disk must not kill the training
        if stop.wait(HEARTBEAT_S):
            return


def mark_queued(out_dir: Path, job_id: str) -> None:
    """The driver's mark on a run whose job waits in the queue, so that no later driver submits it again."""
    ensure_dir(out_dir, "run folder")
    (out_dir / ERROR_NAME).unlink(missing_ok=True)  # an earlier attempt's: not this job's outcome
    write_json_atomic(out_dir / JOB_NAME, {"queued": job_id, "beat_at": time.time()})


def _beat(out_dir: Path) -> dict[str, Any]:
    try:
        beat = json.loads((out_dir / JOB_NAME).read_text())
        return beat if isinstance(beat, dict) else {}
    except (OSError, ValueError):
        return {}


def job_alive(out_dir: Path) -> bool:
    """A job trains this run now (its heartbeat is fresh) or waits in the queue for it (for up to a week:
    delete the run folder's job.json to submit it sooner, e.g. after cancelling the job)."""
    if (out_dir / FINAL_NAME).is_file() or (out_dir / ERROR_NAME).is_file():
        return False  # the job ended (a queued mark may have been written after it)
    beat = _beat(out_dir)
    try:
        age = time.time() - float(beat["beat_at"])
    except (KeyError, TypeError, ValueError):
        return False
    return age < (QUEUED_S if "queued" in beat else STALE_S)


def collect(store: Store, run_id: str) -> bool:
    """Record what a job left in the run's folder (the driver's side of `run_job`); False if nothing."""
    row = store.get(run_id)
    if row is None:
        return False
    out = Path(json.loads(row["config"])["out_dir"])
    try:
        if (out / FINAL_NAME).is_file():
            store.finish(run_id, json.loads((out / FINAL_NAME).read_text()))
            return True
        if (out / ERROR_NAME).is_file():
            store.fail(run_id, json.loads((out / ERROR_NAME).read_text())["error"])
            return True
    except (ValueError, KeyError, TypeError, FinemoeError) as e:  # a cut, foreign or unfinished record
        store.fail(run_id, f"cannot read the job's record in {out} ({type(e).__name__})")
        return True
    return False
