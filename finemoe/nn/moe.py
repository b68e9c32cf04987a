"""The fine-grained MoE layer: router + E*G experts of width d_ff/G + output LayerNorm.

Contract (see model.py): x[B, T, d] -> (y[B, T, d], aux) with differentiable unweighted scalars
`lb_loss` (Switch balance loss; zero under Expert Choice, which is balanced by construction) and
`z_loss` (router z-loss), and a detached per-expert `load` (fraction of routed slots, sums to 1).

Expert Choice groups are the B tokens at one position across the batch (or across each block of
`ec_group_size` consecutive sequences); each expert takes k = round(capacity_factor * B / E) of
them. When that is below 1 token (capacity_factor * B < E, e.g. batch size 1 at evaluation) the
layer routes each token to its top-k' experts instead (token choice, k' = max(1,
round(capacity_factor * G))): the same expected compute per token and the same softmax gates, rather
than a layer that silently outputs zeros. Training in that regime warns once.

Grouping across the batch makes a sequence's output depend on its batch-mates, which inference must
not. So in training each expert keeps a threshold, the running mean of its k-th pick's score, and in
eval mode an Expert Choice layer with thresholds routes each token to the experts whose threshold its
score reaches (`threshold_choice`), whatever the batch. `batch_routing = True` evaluates as training
routes, and `calibrate` sets thresholds for a model trained before they existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.nn.experts import Experts
from finemoe.nn.routing import (
    Router,
    ec_tokens_per_expert,
    expert_choice,
    switch_lb_loss,
    threshold_choice,
    token_choice,
    warn_small_group_once,
    z_loss,
)


@contextlib.contextmanager
def batch_routing(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Evaluate Expert Choice layers as training routes them (groups across the batch), or not."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    before = [m.batch_routing for m in layers]
    for m in layers:
        m.batch_routing = on
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.batch_routing = b


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Set the Expert Choice thresholds of a trained model from training batches (token ids [B, T], B
    large enough for Expert Choice: at least E / capacity_factor), for a model trained before it kept
    them; returns the number of batches used."""
    layers = [m for m in model.modules() if isinstance(m, MoE) and m.cfg.routing == "ec"]
    for m in layers:
        m.ec_threshold.fill_(float("nan"))
        m.ec_batches.zero_()
    was_training = model.training
    model.train()
    n = 0
    for x in batches:
        model(x)
        n += 1
    model.train(was_training)
    if not all(m.calibrated for m in layers):
        raise ConfigError(
            f"{n} batches left Expert Choice thresholds unset: each batch needs at least E/capacity_factor "
            "sequences for Expert Choice to route it"
        )
    return n


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg.d_model, cfg.n_experts, cfg.init_scale)
        self.experts = Experts(cfg)
        self.ln = nn.LayerNorm(cfg.d_model) if cfg.moe_out_norm else nn.Identity()
        # Expert Choice at inference: per-expert score thresholds (NaN until calibrated) and how many
        # training batches went into them; buffers, so checkpoints and exports carry them
        if cfg.routing == "ec":
            self.register_buffer("ec_threshold", torch.full((cfg.n_experts,), float("nan")))
            self.register_buffer("ec_batches", torch.zeros((), dtype=torch.long))
        self.batch_routing = False

    @property
    def calibrated(self) -> bool:
        return self.cfg.routing == "ec" and not bool(torch.isnan(self.ec_threshold).any())

    @property
    def thresholds_route(self) -> bool:
        """Eval mode routes each token by the calibrated thresholds unless asked to route as training."""
        return not self.training and not self.batch_routing and self.calibrated

    @torch.no_grad()
    def _calibrate(self, gates: torch.Tensor, k: int) -> None:
        """Fold this batch's k-th pick score per expert (mean over positions) into the thresholds: a
        running mean over the first 100 batches, then an exponential one that follows training."""
        kth = gates.detach().float().view(self.cfg.n_experts, -1, k).amin(-1).mean(-1)
        weight = (1.0 / (self.ec_batches + 1).float()).clamp(min=0.01)  # on the device: no sync per step
        first = torch.isnan(self.ec_threshold)
        self.ec_threshold.copy_(torch.where(first, kth, (1 - weight) * self.ec_threshold + weight * kth))
        self.ec_batches += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.cfg.routing == "ec":  # weights from before the thresholds existed load uncalibrated
            state_dict.setdefault(prefix + "ec_threshold", torch.full_like(self.ec_threshold, float("nan")))
            state_dict.setdefault(prefix + "ec_batches", torch.zeros_like(self.ec_batches))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def small_group_top_k(self) -> int:
        """Experts per token when an Expert Choice group is too small (see module docstring)."""
        cfg = self.cfg
        return max(1, min(cfg.n_experts, round(cfg.capacity_factor * cfg.granularity)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.group_size(x.shape[0])
        if g == x.shape[0]:
            return self._forward(x)
        # Expert Choice in groups of g sequences: fold the groups into the position axis, so that the
        # tokens at one position of one group are what the router ranks; every other step is per token
        B, T, d = x.shape
        y, aux = self._forward(x.view(B // g, g, T, d).transpose(0, 1).reshape(g, B // g * T, d))
        return y.view(g, B // g, T, d).transpose(0, 1).reshape(B, T, d), aux

    def group_size(self, batch: int) -> int:
        """Sequences per Expert Choice group in a batch of `batch`: model.ec_group_size where it divides
        the batch (training requires it: the trainer checks), else the whole batch."""
        g = self.cfg.ec_group_size
        if g is None or g >= batch or self.thresholds_route:
            return batch
        if batch % g:
            if self.training:
                raise ValueError(
                    f"a batch of {batch} sequences does not split into Expert Choice groups of {g}"
                )
            return batch
        return g

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        B, T, d = x.shape
        n = cfg.n_experts
        logits = self.router(x)  # fp32 [B, T, n]
        probs = logits.softmax(dim=-1)
        xf = x.reshape(B * T, d)
        aux = {"z_loss": z_loss(logits, probs), "lb_loss": logits.new_zeros(())}

        k = ec_tokens_per_expert(B, cfg.expansion_rate, cfg.capacity_factor) if cfg.routing == "ec" else None
        if self.thresholds_route:
            slots = threshold_choice(probs.view(B * T, n), self.ec_threshold)
            y = self.experts(xf, slots)
            aux["load"] = (slots.counts.float() / slots.counts.sum().clamp_min(1)).detach()
        elif k is not None:
            slots = expert_choice(probs, k)
            if self.training:
                self._calibrate(slots.gates, k)
            y = self.experts(xf, slots)
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
