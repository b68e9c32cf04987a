"""Drive a sweep: register its runs in the store, run what is not final, print progress, export CSV.

Re-running a sweep is always safe: finished (done or diverged) runs are skipped, runs left 'running'
by a dead process resume from their checkpoints, failed runs are retried.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finemoe.sweep.executors import make_executor
from finemoe.sweep.runner import collect, job_alive
from finemoe.sweep.spec import Spec
from finemoe.sweep.store import FINAL, Store, owner_alive
from finemoe.train.progress import duration


def todo(store: Store, spec: Spec) -> list[str]:
    rows = {r["run_id"]: r for r in store.rows([r.run_id for r in spec.runs])}
    out = []
    for run in spec.runs:
        row = rows[run.run_id]
        if row["status"] in FINAL:
            continue
        if row["status"] == "running" and owner_alive(row["owner"], row["heartbeat_at"]):
            continue  # another live sweep holds it
        if job_alive(Path(run.config["out_dir"])):
            continue  # a cluster job trains it, submitted by a driver that has since left
        out.append(run.run_id)
    return out


def harvest(store: Store, spec: Spec) -> int:
    """Record the outcomes cluster jobs left in their run folders since the last driver looked."""
    rows = {r["run_id"]: r for r in store.rows([r.run_id for r in spec.runs])}
    return sum(
        collect(store, run.run_id)
        for run in spec.runs
        if rows[run.run_id]["status"] not in FINAL and not job_alive(Path(run.config["out_dir"]))
    )


def run_sweep(
    spec: Spec,
    executor: str | None = None,
    options: dict[str, Any] | None = None,
    dry_run: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run every non-final run of `spec`; returns the store's counts for the spec's runs."""
    store = Store(spec.store)
    store.add(spec.runs, spec.name)
    if spec.csv and Path(spec.csv).is_file():
        n, refused = store.import_finished(spec.csv, [r.run_id for r in spec.runs])
        if n:
            log(f"sweep {spec.name}: took {n} finished runs from {spec.csv}")
        for why in refused:
            log(f"sweep {spec.name}: not taken from {spec.csv} (it trains again): {why}")
    harvested = 0 if dry_run else harvest(store, spec)
    if harvested:
        log(f"sweep {spec.name}: recorded {harvested} runs that jobs finished in their folders")
    pending = todo(store, spec)
    ids = [r.run_id for r in spec.runs]
    counts = store.counts(ids)
    log(
        f"sweep {spec.name}: {len(spec.runs)} runs, {counts['done'] + counts['diverged']} finished, "
        f"{len(pending)} to run  (store {spec.store})"
    )
    labels = {r.run_id: r.label for r in spec.runs}
    if dry_run:
        for rid in pending:
            log(f"  would run {rid}  {labels[rid]}")
    if dry_run or not pending:
        return {
            "sweep": spec.name,
            "store": spec.store,
            "to_run": len(pending),
            **counts,
            "pending": [{"run_id": rid, "label": labels[rid]} for rid in pending],
        }
    opts = {**spec.executor, **{k: v for k, v in (options or {}).items() if v is not None}}
    kind = executor or opts.get("kind") or "local"
    ex = make_executor(kind, opts, spec.runs_dir)
    t0, k = time.time(), 0

    def on_done(rid: str) -> None:
        nonlocal k
        k += 1
        row = store.get(rid) or {}
        loss = row.get("train_loss")
        err = (row.get("error") or "").strip().splitlines()
        what = f"loss {loss:.4f}" if isinstance(loss, float) else (err[-1] if err else "")
        elapsed = time.time() - t0
        eta = f", ETA {duration(elapsed / k * (len(pending) - k))}" if k < len(pending) else ""
        log(
            f"[{k}/{len(pending)}] {row.get('status', '?'):8s} {labels[rid]}  {what}  "
            f"({row.get('wall_time_s') or 0:.0f} s; sweep {elapsed:.0f} s{eta})"
        )
        if spec.csv:
            store.export_csv(spec.csv, ids)

    ex.run(store, pending, spec.trainer, on_done, parents={r.run_id: r.parent for r in spec.runs})
    if spec.csv:
        store.export_csv(spec.csv, ids)
    counts = store.counts(ids)
    return {"sweep": spec.name, "store": spec.store, "to_run": len(todo(store, spec)), **counts}


def status_rows(store: Store, spec: Spec | None = None) -> list[dict[str, Any]]:
    """Rows for `sweep status`: the spec's runs in spec order (unregistered ones as pending), or the whole
    store."""
    if spec is None:
        return store.rows()
    have = (
        {r["run_id"]: r for r in store.rows([r.run_id for r in spec.runs])}
        if Path(spec.store).is_file()
        else {}
    )
    out = []
    for run in spec.runs:
        row = have.get(run.run_id) or {
            "run_id": run.run_id,
            "status": "pending",
            "tokens": run.config["tokens"],
        }
        row = dict(row, label=run.label)
        if row["status"] == "running" and not owner_alive(row.get("owner"), row.get("heartbeat_at")):
            row["status"] = "running (dead; resumes on re-run)"
        out.append(row)
    return out
