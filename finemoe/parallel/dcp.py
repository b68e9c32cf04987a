"""Sharded checkpoints with torch.distributed.checkpoint (DCP): a folder of shards, each rank writing
its own, and the run's metadata (step, schedule, RNG, config) in `meta.pt`.

DCP reshards on load, so a run saved by 4 processes resumes on 2, or on one process without a process
group. The folder is written aside and swapped in, so a kill at any point leaves a complete checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from finemoe.errors import ConfigError

META_NAME = "meta.pt"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def find(folder: str | Path) -> Path | None:
    """The complete sharded checkpoint at `folder`, or the one a kill left aside while replacing it."""
    folder = Path(folder)
    for f in (folder, folder.with_name(f".{folder.name}.old")):
        if (f / META_NAME).is_file() and (f / ".metadata").is_file():
            return f
    return None


def save(
    folder: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]
) -> None:
    """Every rank writes its shards of the model and optimizer (a collective); rank 0 adds the metadata
    and swaps the new folder in for the old one, so a kill at any point leaves a complete checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    main = not _distributed() or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp, no_dist=not _distributed())
    if main:
        torch.save(meta, tmp / META_NAME)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def remove(folder: str | Path) -> None:
    """Drop a sharded checkpoint and what a kill left of one (rank 0, after a newer checkpoint)."""
    folder = Path(folder)
    for f in (folder, folder.with_name(f".{folder.name}.old"), folder.with_name(f".{folder.name}.tmp")):
        shutil.rmtree(f, ignore_errors=True)


def load_meta(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / META_NAME, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(
            f"cannot read {folder / META_NAME} ({type(e).__name__}); not a finemoe checkpoint"
        ) from None


def load(folder: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load the shards into this run's model and optimizer, however they are sharded now."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=folder, no_dist=not _distributed())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
