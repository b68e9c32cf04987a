"""Expert parallelism: each rank of an `ep` group holds n_experts/ep experts, and routed tokens travel
to their expert's rank and back with all_to_all_single.

Routing stays local: every rank routes its own tokens over all experts (Expert Choice in its own
groups), then sends each slot's token to the rank that holds the expert. The experts' weights are
DTensors sharded along the expert axis of a (dp, ep) DeviceMesh, so a checkpoint (DCP) reshards them
to another ep and an export gathers them whole. Non-expert weights stay replicated under DDP; with
`fsdp` too, FSDP2 shards them over all ranks and each expert's slice over its dp ranks
(finemoe.parallel.wrap.shard), as torchtitan composes the two.

Gradients: an expert's weights see the slots of every rank in its ep group through the all_to_all's
backward, and the replicas along dp are summed; dividing by the world size then gives the gradient
of the mean loss over all ranks, as DDP gives for the rest.
"""

from __future__ import annotations

import torch
from torch import nn

from finemoe.kernels.expert_mm import compute_dtype
from finemoe.kernels.paths import grouped_ok
from finemoe.nn.experts import Experts, padded_slots
from finemoe.nn.routing import Slots


class ExpertParallel:
    """The Experts kernel under EP: dispatch slots to the experts' ranks, compute, combine."""

    def __init__(self, mesh):
        self.ep_group = mesh["ep"].get_group()
        self.ep = mesh["ep"].size()

    def __call__(self, experts: Experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

        if slots.counts is not None and grouped_ok(experts, x, compute_dtype(x)):
            return self._grouped(experts, x, slots)
        w1, w2 = experts.w1.to_local(), experts.w2.to_local()
        local, d = w1.shape[0], x.shape[-1]
        idx, gates = padded_slots(slots, local * self.ep)  # [n, C]: expert-major, rank by rank
        caps = [idx.shape[1]] * self.ep  # fixed capacity (Expert Choice): the same on every rank
        if slots.counts is not None:  # padded to this rank's busiest expert: ask the others theirs
            capacity = torch.tensor([idx.shape[1]], device=x.device)
            every = [torch.empty_like(capacity) for _ in range(self.ep)]
            dist.all_gather(every, capacity, group=self.ep_group)
            caps = [int(c) for c in every]
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            send = x.to(dtype)[idx.reshape(-1)]  # [n*C, d]: rank j's experts form the j-th block
            out_rows = [local * c for c in caps]
            got = a2a(send, out_rows, [local * idx.shape[1]] * self.ep, self.ep_group)
            # from each source rank a [local, C_s, d] block: line them up per expert
            h = torch.cat([b.view(local, c, d) for b, c in zip(got.split(out_rows), caps)], dim=1)
            h = torch.bmm(experts.act(torch.bmm(h, w1.to(dtype))), w2.to(dtype))  # [local, sum C_s, d]
            back = torch.cat([b.reshape(-1, d) for b in h.split(caps, dim=1)])
            y = a2a(back, [local * idx.shape[1]] * self.ep, out_rows, self.ep_group)
            y = y.view(idx.shape[0], idx.shape[1], d) * gates.to(dtype).unsqueeze(-1)
            return x.new_zeros(x.shape, dtype=dtype).index_add(0, idx.reshape(-1), y.reshape(-1, d))

    def _grouped(self, experts: Experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        """Token Choice without padding: each rank receives exactly the slots of its experts, sorts
        them by expert, and runs grouped GEMMs (GPUs with grouped_mm; finemoe.kernels.paths.grouped_ok)."""
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.distributed._functional_collectives import all_to_all_single_autograd as a2a

        w1, w2 = experts.w1.to_local(), experts.w2.to_local()
        local = w1.shape[0]
        counts = slots.counts.view(self.ep, local)  # slots for each rank's experts, in rank order
        got_counts = torch.empty_like(counts)  # [source rank, my expert]
        dist.all_to_all_single(got_counts, counts, group=self.ep_group)
        send_rows, got_rows = counts.sum(1).tolist(), got_counts.sum(1).tolist()
        # received: source by source, expert by expert within; grouped GEMMs want expert by expert
        seg = got_counts.reshape(-1)
        start = torch.cumsum(seg, 0) - seg
        by_expert = got_counts.t().reshape(-1)
        first = start.view(self.ep, local).t().reshape(-1)
        order = torch.repeat_interleave(first - (torch.cumsum(by_expert, 0) - by_expert), by_expert)
        order = order + torch.arange(order.numel(), device=order.device)
        offs = torch.cumsum(got_counts.sum(0), 0).to(torch.int32)
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            send = x.to(dtype)[slots.idx]
            got = a2a(send, got_rows, send_rows, self.ep_group)[order]
            h = experts.act(F.grouped_mm(got, w1.to(dtype), offs=offs))
            h = F.grouped_mm(h, w2.to(dtype), offs=offs)
            back = h[torch.argsort(order)]
            y = a2a(back, send_rows, got_rows, self.ep_group) * slots.gates.to(dtype).unsqueeze(-1)
            return x.new_zeros(x.shape, dtype=dtype).index_add(0, slots.idx, y)


def mesh_for(world_size: int, ep: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def shard_experts(model: nn.Module, mesh, fsdp: bool = False) -> list[str]:
    """Keep this rank's slice of every Experts' weights, as DTensors on the mesh; returns their names
    (DDP must leave them alone). The model was initialised alike on every rank, so the slices together
    are the one-process model. With `fsdp` they live on the ep dimension alone, where FSDP2 then shards
    them further over dp (as it composes with tensor parallelism)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    on, placements = (mesh["ep"], [Shard(0)]) if fsdp else (mesh, [Replicate(), Shard(0)])
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            for p in ("w1", "w2"):
                full = getattr(module, p).detach()
                shard = distribute_tensor(full, on, placements)
                setattr(module, p, nn.Parameter(shard))
                names.append(f"{name}.{p}")
            module.kernel = ExpertParallel(mesh)
    return names


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    from torch.distributed.tensor import DTensor

    return [
        p for m in model.modules() if isinstance(m, Experts) for p in (m.w1, m.w2) if isinstance(p, DTensor)
    ]


def finish_expert_grads(model: nn.Module, mesh, world_size: int, fsdp: bool = False) -> None:
    """Sum each expert's gradient over its dp replicas and divide by the world size (see above). Under
    FSDP2, which has averaged them over dp already, only the division by ep is left."""
    import torch.distributed as dist

    dp = mesh["dp"]
    for p in expert_params(model):
        if p.grad is None:
            continue
        g = p.grad.to_local()
        if fsdp:
            g.div_(mesh["ep"].size())
            continue
        if dp.size() > 1:
            dist.all_reduce(g, group=dp.get_group())
        g.div_(world_size)
