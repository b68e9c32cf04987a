"""Run one sweep entry end to end (the driver runs whole sweeps through an executor).

`execute_run` is what every executor calls, in whatever process it uses: claim the row, train (resuming
from the run's checkpoint if one exists), record the final record or the error. A result that reached
`final.json` but not the store (killed in between) is recorded without training again.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

from finemoe.errors import ConfigError, FinemoeError
from finemoe.sweep.store import Store, owner_id

HEARTBEAT_S = 30.0


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


def _heartbeat(store: Store, run_id: str, owner: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            store.heartbeat(run_id, owner)
        except Exception:  # a busy store must not kill the training
            pass


def execute_run(
    store_path: str, run_id: str, trainer: str = "finemoe.sweep.runner:train_run", threads: int | None = None
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
    beat = threading.Thread(target=_heartbeat, args=(store, run_id, owner, stop), daemon=True)
    beat.start()
    try:
        if final.is_file():
            record = json.loads(final.read_text())
        else:
            set_threads(threads)
            fn = resolve_trainer(trainer)
            record = fn(config, (out_dir / "ckpt.pt").is_file())
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
