"""The fine-grained MoE layer: router + E*G experts of width d_ff/G + output LayerNorm.

Contract (see model.py): x[B, T, d] -> (y[B, T, d], aux) with differentiable unweighted scalars
`lb_loss` (Switch balance loss; zero under Expert Choice, which is balanced by construction) and
`z_loss` (router z-loss), and a detached per-expert `load` (fraction of routed slots, sums to 1).

Expert Choice groups are the B tokens at one position across the batch; each expert takes
k = round(capacity_factor * B / E) of them. When that is below 1 token (capacity_factor * B < E,
e.g. batch size 1 at evaluation) the layer routes each token to its top-k' experts instead
(token choice, k' = max(1, round(capacity_factor * G))): the same expected compute per token and
the same softmax gates, rather than a layer that silently outputs zeros. Training in that regime
warns once.
"""

from __future__ import annotations

import torch
from torch import nn

from finemoe.config import ModelConfig
from finemoe.nn.experts import Experts
from finemoe.nn.routing import (
    Router,
    ec_tokens_per_expert,
    expert_choice,
    switch_lb_loss,
    token_choice,
    warn_small_group_once,
    z_loss,
)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.init_scale)
        self.experts = Experts(cfg)
        self.ln = nn.LayerNorm(cfg.d_model) if cfg.moe_out_norm else nn.Identity()

    def small_group_top_k(self) -> int:
        """Experts per token when an Expert Choice group is too small (see module docstring)."""
        cfg = self.cfg
        return max(1, min(cfg.n_experts, round(cfg.capacity_factor * cfg.granularity)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        B, T, d = x.shape
        n = cfg.n_experts
        logits = self.router(x)  # fp32 [B, T, n]
        probs = logits.softmax(dim=-1)
        xf = x.reshape(B * T, d)
        aux = {"z_loss": z_loss(logits, probs), "lb_loss": logits.new_zeros(())}

        k = ec_tokens_per_expert(B, cfg.expansion_rate, cfg.capacity_factor) if cfg.routing == "ec" else None
        if k is not None:
            y = self.experts(xf, expert_choice(probs, k))
            aux["load"] = torch.full((n,), 1.0 / n, device=x.device)  # every expert fills T*k slots
        else:
            if cfg.routing == "ec":
                top = self.small_group_top_k()
                if self.training:
                    warn_small_group_once(B, cfg.expansion_rate, cfg.capacity_factor, top)
            else:
                top = cfg.k_tokens_choice
            slots, _ = token_choice(probs.view(B * T, n), top)
            y = self.experts(xf, slots)
            if cfg.routing == "tc":
                aux["lb_loss"] = switch_lb_loss(probs, slots.counts)
            aux["load"] = (slots.counts.float() / slots.counts.sum()).detach()
        return self.ln(y.view(B, T, d)), aux
