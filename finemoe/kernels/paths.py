"""The default kernel behind `Experts.forward`: the fastest path that applies to the tensors at hand.

- Fixed capacity (Expert Choice): on fp32 CPU the fused kernels (`cpu_fused`) where they build; on
  the opt-in CPU oneDNN path (`cpu_matmul`) grouped 1x1 convolutions; elsewhere two `bmm`s.
- Sorted by expert (Token Choice): grouped GEMMs (`F.grouped_mm`) on GPU; elsewhere (CPU, where
  grouped_mm runs one mm per expert with a slower backward, or unaligned rows) the experts, by load,
  in a few buckets each padded to its heaviest expert (zero gates on the padding), stored one after
  another: one gather, one bmm per bucket, one combine.

Under autocast the tokens are cast once before the gather, not G times after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finemoe.kernels import cpu_fused
from finemoe.kernels.cpu_matmul import onednn_applies
from finemoe.kernels.dispatch import Buckets, Dispatch, PermuteExperts, gather_rows, pad_buckets
from finemoe.kernels.expert_mm import (
    BatchedMM,
    BucketsMM,
    ConvMM,
    ExpertMM,
    GatedOutput,
    GroupedMM,
    activation,
    compute_dtype,
)
from finemoe.nn.routing import Slots


def fast_path(experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
    """Fixed-capacity slots (Expert Choice) or expert-sorted ones (Token Choice), each on the fastest
    path that applies."""
    return capacity(experts, x, slots) if slots.counts is None else sorted_slots(experts, x, slots)


def _weights(experts, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return experts.w1.to(dtype), experts.w2.to(dtype)


def capacity(experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
    """x [N, d] (flattened tokens), slots.idx/gates [n, C] -> sum of gated expert outputs [N, d]."""
    idx = slots.idx.reshape(-1)
    if slots.by_token is not None:
        dispatch = Dispatch(idx, *slots.by_token)
    else:
        dispatch = Dispatch.sorting(idx, x.shape[0])
    return capacity_slots(experts, x, slots, dispatch)


def capacity_slots(
    experts,
    x: torch.Tensor,
    slots: Slots,
    dispatch: Dispatch,
    weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Fixed-capacity path for all experts, or for the experts whose `weights` are given (one per
    row of slots.idx)."""
    dtype = compute_dtype(x)
    n, C = slots.idx.shape
    gates = slots.gates
    with torch.autocast(x.device.type, enabled=False):
        w1, w2 = weights if weights is not None else _weights(experts, dtype)
        x = x.to(dtype)
        if onednn_applies(x, w1):  # the CPU oneDNN path (finemoe.kernels.cpu_matmul)
            mm, shape = ConvMM(n), (C, -1)
            dispatch, gates = dispatch.capacity_major(n, C), gates.t()
        elif experts.use_cpu_kernels and experts.act is F.relu and cpu_fused.applies(x, w1, n):
            return cpu_fused.FusedExpertChoice.apply(
                x.contiguous(),
                w1.contiguous(),
                w2.contiguous(),
                gates.to(dtype).contiguous(),
                slots.idx.contiguous(),
                dispatch,
            )
        else:
            mm, shape = BatchedMM(), (n, C, -1)
        xg = gather_rows(x, dispatch).view(*shape)
        h = activation(ExpertMM.apply(xg, w1, mm), experts.act)
        return GatedOutput.apply(h, w2, gates.to(dtype), dispatch, mm)


def sorted_slots(experts, x: torch.Tensor, slots: Slots) -> torch.Tensor:
    """x [N, d], slots sorted by expert with per-expert counts -> [N, d]."""
    dtype = compute_dtype(x)
    if not grouped_ok(experts, x, dtype):
        buckets = pad_buckets(slots)
        with torch.autocast(x.device.type, enabled=False):
            # experts in load order: each bucket is a contiguous slice
            w1, w2 = (PermuteExperts.apply(w, buckets.order) for w in _weights(experts, dtype))
        if onednn_applies(x, w1):
            return buckets_one_by_one(experts, x, buckets, w1, w2)
        # routed pairs listed expert by expert, as the router gave them, with their padded slots
        dispatch = Dispatch.sorting(buckets.idx, x.shape[0], slots.idx, buckets.slot_of_pair)
        with torch.autocast(x.device.type, enabled=False):
            mm = BucketsMM(buckets.rows, buckets.caps)
            xg = gather_rows(x.to(dtype), dispatch)
            h = activation(ExpertMM.apply(xg, w1, mm), experts.act)
            return GatedOutput.apply(h, w2, buckets.gates.to(dtype), dispatch, mm)
    offs = torch.cumsum(slots.counts, 0).to(torch.int32)
    dispatch = Dispatch.sorting(slots.idx, x.shape[0])
    with torch.autocast(x.device.type, enabled=False):
        w1, w2 = _weights(experts, dtype)
        xs = gather_rows(x.to(dtype), dispatch)
        mm = GroupedMM(offs)
        h = activation(ExpertMM.apply(xs, w1, mm), experts.act)
        return GatedOutput.apply(h, w2, slots.gates.to(dtype), dispatch, mm)


def buckets_one_by_one(
    experts, x: torch.Tensor, buckets: Buckets, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Each bucket through the fixed-capacity path on its own (its convolutions need one layout per
    bucket), the outputs summed."""
    out = None
    for part, e, pairs in buckets.parts():
        dispatch = Dispatch.sorting(part.idx.reshape(-1), x.shape[0], *pairs)
        y = capacity_slots(experts, x, part, dispatch, weights=(w1[e], w2[e]))
        out = y if out is None else out + y
    return out


def grouped_ok(experts, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """grouped_mm needs 16-byte aligned row strides. On CPU it runs one mm per expert and its
    backward is slower than bmm (docs/performance.md), so the padded bmm path is the default there."""
    if experts.use_grouped_mm is False or not hasattr(F, "grouped_mm"):  # torch without it (before 2.10)
        return False
    size = torch.empty((), dtype=dtype).element_size()
    d, w = experts.w1.shape[1], experts.w1.shape[2]
    if (d * size) % 16 or (w * size) % 16:
        return False
    if experts.use_grouped_mm:
        return True
    return (
        x.device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (9, 0)
    )
