"""DDP replicas or FSDP2 shards on a DeviceMesh, around a model built as for one process.
 Under `parallel: {fsdp: true}`
every block, then the whole model, is `fully_shard`ed over the data-parallel ranks, so each rank
keeps 1/world of the parameters, gradients and AdamW states and gathers a block's weights just for
its forward and backward (torchtitan applies FSDP2 the same way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def shard(model: nn.Module, world_size: int, device: torch.device, ep_mesh=None) -> None:
    """FSDP2 in place: each block is one unit of gathering, the rest (embeddings, head) the root's.

    Under expert parallelism (`ep_mesh`, experts already split over its ep dimension) the experts are
    their own unit, sharded over the dp dimension only. FSDP2 then averages their gradients over dp;
    each already sums its ep group's tokens, so the trainer divides them by ep
    (expert_parallel.finish_expert_grads; a custom divide factor needs PREMUL_SUM, which gloo lacks).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from finemoe.nn.experts import Experts

    if ep_mesh is None:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_shard",))
    else:
        mesh = ep_mesh["dp", "ep"]._flatten("dp_ep")
    for block in model.blocks:
        if ep_mesh is not None:
            for experts in [m for m in block.modules() if isinstance(m, Experts)]:
                # dim 1: dim 0 (the experts) is ep's
                fully_shard(experts, mesh=ep_mesh["dp"], shard_placement_fn=lambda p: Shard(1))
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over gradients held on different meshes, or as shards beside plain replicas
    (expert parallelism, with or without FSDP2), which torch's own cannot combine: one norm per mesh,
    made whole, then one global norm."""
    import math

    from torch.distributed.tensor import DTensor

    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p.grad)
    if not by_mesh:
        return torch.zeros(())
    squares = [local_value(torch.nn.utils.get_total_norm(g)).square() for g in by_mesh.values()]
    total = torch.stack(squares).sum().sqrt()
    if math.isfinite(max_norm):
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0).item()
        for grads in by_mesh.values():  # one mesh per call: foreach ops do not mix them
            torch._foreach_mul_(grads, scale)
    return total


def replicate(model: nn.Module, device: torch.device, ignore: list[str] = ()) -> nn.Module:
    """DDP: a full replica per rank, gradients all-reduced; `ignore` names parameters it leaves alone
    (expert-parallel shards, whose gradients are finished apart)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ignore:
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def mesh_count(model: nn.Module) -> int:
    """How many device meshes this model's sharded parameters live on (FSDP2 with EP: two)."""
    from torch.distributed.tensor import DTensor

    return len({id(p.device_mesh) for p in model.parameters() if isinstance(p, DTensor)})


def sharded(model: nn.Module) -> bool:
    """Whether some of this model's parameters are held as shards (DTensors: FSDP2 or experts under EP)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(step_model: nn.Module, on: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last micro-batch of
    a step: the gradients accumulate locally and are averaged once."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(step_model, DDP):
        with contextlib.nullcontext() if on else step_model.no_sync():
            yield
        return
    if hasattr(step_model, "set_requires_gradient_sync"):  # an FSDP2 module
        step_model.set_requires_gradient_sync(on)
    yield


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from what a reduction over sharded parameters returns (a replicated DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(tensors) -> int:
    """Bytes this rank stores for these tensors: a sharded one counts only its local shard."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model state on the CPU, on rank 0 (a collective under FSDP2; other ranks get {})."""
    if not sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
