"""Data parallelism under torchrun: one process per rank, gradients averaged by DDP.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them the run is a single process. Every rank draws
its rows of the same global batch (TokenFile.batch), so a run is the same for any world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a no-op without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        _import_group_defaults()
        if device_type == "cuda":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return d


def _import_group_defaults() -> None:
    """Import what DDP and torch.compile import, before the process group exists.

    Some torch.distributed modules (torch.distributed.nn.functional, pulled in by torch._dynamo,
    which DDP imports) take `group.WORLD` as a default argument. Imported after
    init_process_group they keep the default group alive for good, so destroy_process_group never
    stops gloo's worker threads. A worker that then frees a finished collective's tensors after
    the interpreter began to shut down aborts the process ("terminate called without an active
    exception"), which torchrun reports as a failed run. Imported first, the default is None.
    """
    import torch._dynamo  # noqa: F401


def teardown(d: Dist) -> None:
    """Destroy the process groups once nothing holds them: FSDP2's module states and DTensor meshes sit
    in reference cycles that only the collector frees, and a group they keep alive keeps gloo's worker
    threads running into interpreter shutdown (see `_import_group_defaults`)."""
    if d.enabled and dist.is_initialized():
        import gc

        gc.collect()
        dist.destroy_process_group()


def mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if not d.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / d.world_size


def pool_thresholds(model: torch.nn.Module, d: Dist) -> None:
    """Replace every rank's Expert Choice thresholds by their mean over the ranks.

    Each rank's thresholds are running means over its own share of every batch. The update is linear
    in each batch's statistic, a mean over equal shares, so the mean over ranks follows what one process
    training on the whole batches computes, and pooling at any step (each checkpoint, the end) leaves
    that path unchanged. With micro-batches a rank folds in more, smaller batches per step than one
    process does, so past the running mean's first 100 batches the two drift apart slightly.
    """
    if not d.enabled:
        return
    for name, b in model.named_buffers():
        if name.endswith("ec_threshold"):
            torch.distributed.all_reduce(b)
            b.div_(d.world_size)


def broadcast_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Every rank takes rank 0's buffers (what rank 0 saves), the Expert Choice thresholds pooled."""
    if not d.enabled:
        return
    pool_thresholds(model, d)
    for name, b in model.named_buffers():
        if not name.endswith("ec_threshold"):
            torch.distributed.broadcast(b, src=0)


def all_ok(ok: bool, d: Dist) -> bool:
    """Whether every rank is ok: a failure on one rank stops all, instead of leaving the others waiting in
    the next collective."""
    if not d.enabled:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
