"""Checkpoints that make a resumed run continue bit for bit.

A checkpoint holds the model, optimizer and LR-scheduler states, every RNG state (python, numpy,
torch, CUDA), the step (batches are a pure function of the step, so it is also the data position),
the recent losses the smoothed loss needs, and the elapsed time. It is written to a temp file and
renamed, so a kill mid-write leaves the previous checkpoint intact.

A run with `parallel: {fsdp: true}` writes a sharded checkpoint instead: a folder of
torch.distributed.checkpoint (DCP) shards, each rank writing its own, plus the same metadata in
`meta.pt`. DCP reshards on load, so such a run resumes at any world size, one process included.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finemoe.errors import ConfigError
from finemoe.io import atomic_path

CKPT_NAME = "ckpt.pt"
SHARDED_NAME = "ckpt"  # the sharded checkpoint's folder (finemoe.parallel.dcp)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, **state: Any) -> None:
    state["rng"] = rng_state()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; point at a run folder or its {CKPT_NAME}")
    try:
        # our own files: they hold numpy RNG state and python tuples, which weights_only rejects
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(
            f"cannot read checkpoint {path} ({type(e).__name__}); it is not a finemoe checkpoint"
        ) from None


def save_sharded(
    folder: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **state: Any
) -> None:
    """A sharded checkpoint: every rank writes its shards, rank 0 the metadata with the RNG states."""
    from finemoe.parallel import dcp

    dcp.save(folder, model, opt, {**state, "rng": rng_state()})
