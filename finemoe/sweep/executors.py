"""Where runs execute: in this process, in local worker processes, or as Slurm jobs via submitit.

Local executors end in `runner.execute_run(store, run_id, ...)`, which claims the run in the store, so
they only decide where and how many at a time; the store arbitrates. Slurm jobs run `runner.run_job`
instead and leave their outcome in the run folder, which the driver records: on a cluster only the
driver writes the store. An executor's `run` calls `on_done(run_id)` after each run so the sweep can
print progress and export the CSV.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from finemoe.errors import ConfigError
from finemoe.io import ensure_dir
from finemoe.sweep.runner import collect, default_threads, execute_run, heartbeat, mark_queued, run_job
from finemoe.sweep.store import Store, owner_id

OnDone = Callable[[str], None]


def waves(run_ids: Sequence[str], parents: dict[str, str | None]) -> list[list[str]]:
    """Runs grouped so that each one comes after its parent (a stable run before its branches)."""
    left, out = list(run_ids), []
    while left:
        wave = [r for r in left if parents.get(r) not in left]
        if not wave:  # a cycle cannot come from a spec; run the rest rather than hang
            wave = left
        out.append(wave)
        left = [r for r in left if r not in wave]
    return out


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the sweep process dies, even by SIGKILL, so no orphan keeps
    training."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class InProcessExecutor:
    """One run after another in this process (debugging; no isolation between runs)."""

    def __init__(self, threads: int | None = None, **_: Any):
        self.threads = threads

    def run(
        self,
        store: Store,
        run_ids: Sequence[str],
        trainer: str,
        on_done: OnDone,
        parents: dict[str, str | None] | None = None,
    ) -> None:
        for wave in waves(run_ids, parents or {}):
            for rid in wave:
                execute_run(str(store.path), rid, trainer, self.threads)
                on_done(rid)


class LocalExecutor:
    """A small pool of worker processes, one fresh process per run (clean memory, exact thread count).

    On 2 cores the default is 1 worker x 2 threads: a small model's GEMMs scale across both cores
    better than two runs share them, and one run at a time keeps the progress bar readable.
    """

    def __init__(self, workers: int = 1, threads: int | None = None, log_dir: str | None = None, **_: Any):
        if int(workers) < 1:
            raise ConfigError(f"executor workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.threads = int(threads) if threads else default_threads(self.workers)
        self.log_dir = log_dir

    def _spawn(self, store: Store, rid: str, trainer: str) -> subprocess.Popen:
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(self.threads)
        cmd = [
            sys.executable,
            "-m",
            "finemoe.sweep.worker",
            str(store.path),
            rid,
            "--trainer",
            trainer,
            "--threads",
            str(self.threads),
        ]
        out = None
        if self.workers > 1 and self.log_dir:  # interleaved progress bars are unreadable: log to files
            ensure_dir(self.log_dir, "log folder")
            out = open(Path(self.log_dir) / f"{rid}.log", "ab")
        try:
            return subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_die_with_parent,
            )
        finally:
            if out:
                out.close()

    def run(
        self,
        store: Store,
        run_ids: Sequence[str],
        trainer: str,
        on_done: OnDone,
        parents: dict[str, str | None] | None = None,
    ) -> None:
        """A branch waits while its stable parent is queued or training, then starts from its snapshot."""
        parents = parents or {}
        queue = list(run_ids)
        live: dict[str, subprocess.Popen] = {}
        try:
            while queue or live:
                while len(live) < self.workers:
                    ready = [r for r in queue if parents.get(r) not in queue and parents.get(r) not in live]
                    if not ready:
                        break
                    queue.remove(ready[0])
                    live[ready[0]] = self._spawn(store, ready[0], trainer)
                time.sleep(0.2)
                for rid, proc in list(live.items()):
                    if proc.poll() is None:
                        continue
                    del live[rid]
                    row = store.get(rid)
                    if proc.returncode != 0 and row and row["status"] == "running":
                        # the worker died without recording (OOM kill, segfault): say so and go on
                        store.fail(
                            rid,
                            f"worker process exited with code {proc.returncode} before recording a result",
                        )
                    on_done(rid)
        finally:
            for proc in live.values():  # Ctrl-C: stop workers; their rows resume from checkpoints next time
                proc.terminate()
            for proc in live.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


class SlurmExecutor:
    """One Slurm job per run through submitit (an array when possible); waits for them unless wait=False.

    `cluster` is passed to submitit.AutoExecutor: 'slurm' on a cluster, 'local' to try a spec locally.
    `procs_per_run` > 1 launches each run through torchrun inside its job (one process per GPU; ask
    for as many with gpus_per_node). Other keys go to `update_parameters` (timeout_min,
    slurm_partition, gpus_per_node, cpus_per_task, mem_gb, slurm_array_parallelism, ...).

    Jobs never write the store (see runner.run_job): this driver claims the runs, heartbeats them while
    it waits, and records what each job left in its run folder.
    """

    def __init__(
        self,
        folder: str,
        cluster: str | None = "slurm",
        threads: int | None = None,
        wait: bool = True,
        procs_per_run: int = 1,
        **params: Any,
    ):
        if not isinstance(procs_per_run, int) or isinstance(procs_per_run, bool) or procs_per_run < 1:
            raise ConfigError(f"executor procs_per_run must be a whole number >= 1, got {procs_per_run!r}")
        self.folder, self.cluster, self.threads, self.wait = folder, cluster, threads, wait
        self.procs = procs_per_run
        self.params = {"timeout_min": 60 * 24, **params}

    def run(
        self,
        store: Store,
        run_ids: Sequence[str],
        trainer: str,
        on_done: OnDone,
        parents: dict[str, str | None] | None = None,
    ) -> None:
        """Stable runs are submitted before their branches, one wave after another when waiting."""
        try:
            import submitit
        except ImportError:
            raise ConfigError("the slurm executor needs submitit: pip install 'finemoe[slurm]'") from None
        if not run_ids:
            return
        try:
            ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        except Exception as e:  # no sbatch on this machine, an unknown cluster name
            raise ConfigError(
                f"cannot use the {self.cluster} executor here ({e}); use --executor local"
            ) from None
        try:
            ex.update_parameters(**self.params)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"slurm executor parameters rejected by submitit: {e}") from None
        for wave in waves(run_ids, parents or {}) if self.wait else [list(run_ids)]:
            self._submit(ex, store, wave, trainer, on_done)

    def _submit(self, ex, store: Store, run_ids: Sequence[str], trainer: str, on_done: OnDone) -> None:
        owner = owner_id()
        rows = {rid: store.claim(rid, owner) for rid in run_ids}
        run_ids = [rid for rid in run_ids if rows[rid] is not None]  # others are held by a live sweep
        n = len(run_ids)
        if not n:
            return
        configs = [json.loads(rows[rid]["config"]) for rid in run_ids]
        jobs = ex.map_array(run_job, configs, [trainer] * n, [self.threads] * n, [self.procs] * n)
        for config, job in zip(configs, jobs):
            mark_queued(Path(config["out_dir"]), job.job_id)
        print(f"submitted {n} job(s): {', '.join(j.job_id for j in jobs[:5])}{' ...' if n > 5 else ''}")
        if not self.wait:
            return
        stop = threading.Event()
        beat = threading.Thread(target=heartbeat, args=(store, list(run_ids), owner, stop), daemon=True)
        beat.start()
        try:
            for rid, job in zip(run_ids, jobs):
                why = "the job ended without leaving final.json or error.json"
                try:
                    job.result()
                except Exception as e:  # the job itself died (timeout, preemption, node failure)
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    why = f"slurm job {job.job_id} failed: {first}"
                if not collect(store, rid):
                    store.fail(rid, why)
                on_done(rid)
        finally:
            stop.set()


def make_executor(kind: str, options: dict[str, Any], runs_dir: str):
    """Build an executor from the spec's `executor:` mapping merged with command-line overrides."""
    opts = {k: v for k, v in options.items() if v is not None and k != "kind"}
    if kind == "local":
        return LocalExecutor(log_dir=str(Path(runs_dir) / "logs"), **opts)
    if kind == "inprocess":
        return InProcessExecutor(**opts)
    if kind in ("slurm", "submitit-local"):
        opts.pop("workers", None)
        cluster = "local" if kind == "submitit-local" else opts.pop("cluster", "slurm")
        return SlurmExecutor(folder=str(Path(runs_dir) / "submitit"), cluster=cluster, **opts)
    raise ConfigError(f"unknown executor {kind!r}; use local, inprocess, slurm or submitit-local")
