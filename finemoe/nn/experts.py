"""The experts: E*G bias-free FFNs of width d_ff/G, stacked for batched matmuls, with one readable
reference computation and one seam where a fast path from finemoe.kernels does the work."""

from __future__ import annotations

import torch
from torch import nn

from finemoe.config import ModelConfig
from finemoe.kernels.expert_mm import compute_dtype
from finemoe.kernels.paths import fast_path
from finemoe.nn.activations import ACT
from finemoe.nn.init import trunc_normal_
from finemoe.nn.routing import Slots


def padded_slots(slots: Slots, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots as [n_experts, C] token ids and gates: as they are for fixed capacity; expert-sorted
    slots padded to the busiest expert's count, padding pointing at token 0 with gate 0."""
    if slots.counts is None:
        return slots.idx, slots.gates
    counts = slots.counts
    C = int(counts.max()) if counts.numel() else 0
    expert = torch.repeat_interleave(torch.arange(n_experts, device=counts.device), counts)
    pos = torch.arange(slots.idx.numel(), device=counts.device) - (torch.cumsum(counts, 0) - counts)[expert]
    idx = slots.idx.new_zeros(n_experts, C).index_put((expert, pos), slots.idx)
    gates = slots.gates.new_zeros(n_experts, C).index_put((expert, pos), slots.gates)
    return idx, gates


class Experts(nn.Module):
    """n_experts = E*G bias-free FFNs of width d_ff/G, weights stacked for batched matmuls.

    `forward` hands the work to `self.kernel`, the one place a fast path is chosen (`fast_path` by
    default); `reference` is the plain computation each of them is tested against.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n, d, w = cfg.n_experts, cfg.d_model, cfg.expert_width
        self.w1 = nn.Parameter(torch.empty(n, d, w))
        self.w2 = nn.Parameter(torch.empty(n, w, d))
        trunc_normal_(self.w1, d, cfg.init_scale)
        # paper setting: fan_in of the second matrix is the active hidden width d_ff, whatever G
        trunc_normal_(self.w2, cfg.d_ff, cfg.init_scale)
        self.act = ACT[cfg.activation]
        # None: grouped GEMM where it is fast (CUDA sm90+, bf16); True/False force it on or off.
        self.use_grouped_mm: bool | None = None
        # Expert Choice on fp32 CPU runs the fused kernels (finemoe.kernels.cpu_fused) where they
        # apply; False keeps the unfused path.
        self.use_cpu_kernels = True
        self.kernel = fast_path

    def forward(self, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        """x [N, d] (the tokens, flattened) and their routed slots -> the gated sum of expert outputs."""
        return self.kernel(self, x, slots)

    def reference(self, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        """Gather each slot's token, two batched matmuls around the activation, scale by the gate, add
        into the token: what every fast path computes, in plain PyTorch."""
        idx, gates = padded_slots(slots, self.w1.shape[0])
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            h = self.act(torch.bmm(x.to(dtype)[idx], self.w1.to(dtype)))
            y = torch.bmm(h, self.w2.to(dtype)) * gates.to(dtype).unsqueeze(-1)
            return x.new_zeros(x.shape, dtype=dtype).index_add(0, idx.reshape(-1), y.reshape(-1, x.shape[-1]))
