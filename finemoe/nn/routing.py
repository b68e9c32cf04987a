"""Routers: which tokens each expert processes, and with what weight.

Both routers share one linear map d_model -> n_experts without bias, evaluated in fp32 with autocast
off (the paper keeps the router in high precision), followed by a softmax over experts.

Expert Choice (paper): a routing group is the set of tokens at the same position across the B
sequences of the batch, so no token ever competes with a later token of its own sequence and the
model stays causal. Each expert takes its top-k tokens of every group, k = capacity_factor * B / E.
Token Choice: each token takes its top-k experts (k = G by default); dropless.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from finemoe.kernels.cpu_matmul import linear
from finemoe.nn.init import trunc_normal_


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, init_scale: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        trunc_normal_(self.weight, d_model, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., n_experts] whatever the autocast state (paper: router in high precision)."""
        with torch.autocast(x.device.type, enabled=False):
            return linear(x.float(), self.weight.float())


@dataclass
class Slots:
    """Routed (expert, token) pairs in expert-major order.

    `idx` holds token ids ([n_experts, capacity] under Expert Choice, flat [n_slots] with `counts` per
    expert under Token Choice) and `gates` the fp32 softmax scores. `by_token`, when the router has
    it for free, is (perm, offsets): the slots listed token by token and where each token's run
    starts, which the combine needs (otherwise it is sorted out of `idx`).
    """

    idx: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor | None = None
    by_token: tuple[torch.Tensor, torch.Tensor] | None = None


def ec_tokens_per_expert(group_size: int, expansion_rate: int, capacity_factor: float) -> int | None:
    """k for Expert Choice, or None when the group is too small for k >= 1.

    k = capacity_factor * group_size / E rounded half up (the paper's round(256/64) = 4), at most the
    group size. Below 1 (e.g. batch size 1 at evaluation) the caller falls back to token choice.
    """
    exact = capacity_factor * group_size / expansion_rate
    if exact < 1:
        return None
    return min(group_size, int(math.floor(exact + 0.5)))


def _from_mask(mask: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert ids, token ids, gates) of the selected pairs, expert-major.

    nonzero() on the [n_experts, n_tokens] mask yields them already sorted by (expert, token) in
    linear time; argsort of the flat pairs was a tenth of the layer's time on CPU.
    """
    n = mask.shape[0]
    e, t = mask.nonzero(as_tuple=True)
    gates = probs.reshape(-1).index_select(0, t * n + e)  # probs is [n_tokens, n]
    return e, t, gates


# Up to this many picks per expert and group, top-k by repeated max over the batch axis (below).
_SMALL_K = 4


def _pick_dtype(k: int) -> torch.dtype:
    return torch.int8 if k < 128 else torch.int32


def _top_k_dim0(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of p along dim 0, ties to the lowest index: their indices [k, ...]
    (int64, largest first) and a map [B, ...] holding j+1 where pick j was taken, else 0.
    Overwrites p (the caller's scratch copy).

    k passes of a max-reduction over the leading axis, each vectorised across the contiguous
    trailing axes, and a scatter of -inf over each pick; topk over a [T*n, B] permuted copy is slower
    on its many tiny rows (docs/performance.md). The lowest index among equal maxima is an amax of
    reversed ranks, as max(dim) with indices is slower along dim 0; bool masks are kept out of the
    full-size passes (each bool where/masked_fill costs several arithmetic passes on CPU).
    """
    B = p.shape[0]
    rank_dtype = torch.int16 if B < 2**15 else torch.int32
    reverse = torch.arange(B, 0, -1, dtype=rank_dtype, device=p.device).view((B,) + (1,) * (p.dim() - 1))
    order = torch.zeros(p.shape, dtype=_pick_dtype(k), device=p.device)
    picks = []
    for j in range(k):
        hit = p == p.amax(0, keepdim=True)
        first = (B - (hit * reverse).amax(0, keepdim=True)).long()  # lowest row index of a max
        order.scatter_(0, first, j + 1)
        picks.append(first)
        if j + 1 < k:
            p.scatter_(0, first, float("-inf"))
    return torch.cat(picks), order


def expert_choice(probs: torch.Tensor, k: int) -> Slots:
    """probs [B, T, n_experts]; each expert takes its top-k of the B tokens at every position t.

    Returns capacity T*k per expert, slot t*k + j of an expert holding its j-th pick at position t;
    token ids index the flattened [B*T] tokens. The token-major listing (`by_token`) comes from
    the map of picks in token order, so the combine needs no sort.
    """
    B, T, n = probs.shape
    dev = probs.device
    p = probs.detach().nan_to_num(nan=-1.0)  # a copy; a NaN (diverged) score never beats a probability
    if k <= _SMALL_K:
        b, order = _top_k_dim0(p, k)  # [k, T, n], [B, T, n]
    else:
        b = p.permute(2, 1, 0).contiguous().topk(k, dim=-1, sorted=False).indices  # [n, T, k]
        b = b.permute(2, 1, 0)
        dtype = _pick_dtype(k)
        order = torch.zeros(B, T, n, dtype=dtype, device=dev)
        order.scatter_(0, b, torch.arange(1, k + 1, dtype=dtype, device=dev).view(k, 1, 1).expand_as(b))
    positions = torch.arange(T, device=dev)
    experts = torch.arange(n, device=dev)
    idx = (b * T + positions.view(1, T, 1)).permute(2, 1, 0).contiguous().view(n, T * k)
    gates = probs.reshape(-1).index_select(0, (idx * n + experts.view(n, 1)).view(-1))
    # token-major: nonzero lists the picks by token, then expert; order says which pick each was
    flat = order.view(B * T, n)
    token, expert = flat.nonzero(as_tuple=True)
    j = flat.view(-1).index_select(0, token * n + expert).long() - 1
    perm = expert * (T * k) + (token % T) * k + j
    counts = torch.bincount(token, minlength=B * T)
    return Slots(idx, gates.view(n, T * k), by_token=(perm, torch.cumsum(counts, 0) - counts))


def threshold_choice(probs: torch.Tensor, threshold: torch.Tensor) -> Slots:
    """probs [N, n_experts]; each expert takes every token whose score reaches its threshold.

    A decision per token, so a sequence is routed the same whatever its batch-mates and whether it
    runs alone: Expert Choice for inference, with thresholds calibrated on training batches (the
    score an expert's k-th pick had there). Slots come expert-major with per-expert counts.
    """
    n = probs.shape[-1]
    expert, token = (probs.detach() >= threshold).t().nonzero(as_tuple=True)
    counts = torch.bincount(expert, minlength=n)
    return Slots(token, probs[token, expert], counts=counts)


def token_choice(probs: torch.Tensor, k: int) -> tuple[Slots, torch.Tensor]:
    """probs [N, n_experts]; each token takes its top-k experts, none dropped.

    Gates are the (unrenormalised) softmax scores, as in Expert Choice and Switch. Returns the slots
    sorted by expert, with counts, and the expert ids [N, k] of every token.
    """
    N, n = probs.shape
    experts = probs.detach().topk(k, dim=-1).indices  # [N, k]
    mask = torch.zeros(N, n, dtype=torch.bool, device=probs.device)
    mask.scatter_(1, experts, True)
    mask = mask.t()
    e, t, gates = _from_mask(mask, probs)
    counts = torch.bincount(e, minlength=n)
    return Slots(t, gates, counts), experts


def switch_lb_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss n * sum_e f_e P_e (1 when perfectly balanced).

    f_e: fraction of routed slots that went to expert e (no gradient); P_e: mean router probability.
    """
    n = probs.shape[-1]
    f = counts.float() / counts.sum().clamp_min(1)
    return n * (f * probs.reshape(-1, n).mean(0)).sum()


def z_loss(logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps router logits small.

    With the softmax `probs` of these logits already at hand, log Z = max logit - log(max prob): two
    max-reductions instead of logsumexp's exp pass, the same value and the same gradient (softmax),
    and the log of a number >= 1/n_experts, so no precision lost.
    """
    n = logits.shape[-1]
    logits = logits.reshape(-1, n)
    if probs is None:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        lse = logits.amax(-1) - probs.reshape(-1, n).amax(-1).log()
    return lse.square().mean()


_warned_small_group = False


def warn_small_group_once(group_size: int, expansion_rate: int, capacity_factor: float, k: int) -> None:
    """Training on groups too small for Expert Choice changes the routing; say so once."""
    global _warned_small_group
    if not _warned_small_group:
        _warned_small_group = True
        warnings.warn(
            f"expert choice group of {group_size} tokens gives capacity_factor*B/E = "
            f"{capacity_factor * group_size / expansion_rate:.3g} < 1 token per expert; routing each token "
            f"to its top-{k} experts instead. Use a batch of at least E/capacity_factor = "
            f"{math.ceil(expansion_rate / capacity_factor)} sequences for expert choice training.",
            stacklevel=3,
        )
