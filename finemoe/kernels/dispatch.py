"""Dispatch and padding: where each routed slot's token comes from, and how it returns.

Gather and combine are each the other's backward: index_select, and a per-token segmented sum
(embedding_bag over the slots sorted by token). Token Choice's dropless slots are padded into a few
buckets of experts, each a fixed-capacity problem for batched matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finemoe.nn.routing import Slots


class Dispatch:
    """Where each slot's token comes from (`idx`), and the slots in token-major order (`perm`, with
    `offsets` of each token's first slot) so the combine is one segmented sum per token."""

    def __init__(self, idx: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor):
        self.idx, self.perm, self.offsets = idx, perm, offsets

    @classmethod
    def sorting(
        cls,
        idx: torch.Tensor,
        n_tokens: int,
        tokens: torch.Tensor | None = None,
        slot_ids: torch.Tensor | None = None,
    ) -> "Dispatch":
        """`tokens` [n_pairs]: the tokens of the routed pairs in expert-major order (ascending within an
        expert), `slot_ids` their slots; padding slots, if any, appear in `idx` only. Without them
        every slot of `idx` is a routed pair. A stable sort of such runs of ascending tokens is
        cheap (docs/performance.md)."""
        if tokens is None:
            tokens, slot_ids = idx, torch.arange(idx.numel(), device=idx.device)
        perm = slot_ids[torch.argsort(tokens, stable=True)]
        counts = torch.bincount(tokens, minlength=n_tokens)
        return cls(idx, perm, torch.cumsum(counts, 0) - counts)

    def capacity_major(self, n: int, C: int) -> "Dispatch":
        """The same routing with fixed-capacity slots [n, C] stored [C, n]: slot e*C + c becomes
        c*n + e."""
        perm = (self.perm % C) * n + torch.div(self.perm, C, rounding_mode="floor")
        return Dispatch(self.idx.view(n, C).t().reshape(-1), perm, self.offsets)

    def gather(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x[idx], each row times weights[slot] if given (one-row bags of embedding_bag: one pass,
        where index_select and a mul make two over [slots, d])."""
        if weights is None:
            return x.index_select(0, self.idx)
        singles = torch.arange(self.idx.numel(), device=self.idx.device)
        return F.embedding_bag(self.idx, x, singles, mode="sum", per_sample_weights=weights)

    def combine(self, y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum of the slots of token t, each times weights[slot] if given. embedding_bag
        reduces each token's slots in one pass, parallel over tokens: faster on CPU than index_add_ with
        unsorted indices (docs/performance.md), and weighting costs it nothing measurable."""
        w = None if weights is None else weights.index_select(0, self.perm)
        return F.embedding_bag(self.perm, y, self.offsets, mode="sum", per_sample_weights=w)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        ctx.dispatch = dispatch
        return dispatch.gather(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.dispatch.combine(g.contiguous()), None


def gather_rows(x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """x[idx] for a 2-D x; the backward is the combine."""
    return _GatherRows.apply(x, dispatch)


class PermuteExperts(torch.autograd.Function):
    """w[order] for a permutation `order` of the experts; the backward gathers by the inverse
    permutation instead of adding into zeros. Advanced indexing, not index_select, which is slow on
    these few large rows (docs/performance.md)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        ctx.save_for_backward(inverse)
        return w[order]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return g[inverse], None


def bucket_cuts(c: list[int], max_buckets: int) -> list[int]:
    """Cut points of the descending counts `c` into at most `max_buckets` buckets, each padded to its
    first (largest) count, minimising the total padded slots (exact DP, vectorised over the cut)."""
    n = len(c)
    cnt = torch.tensor(c, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    j = torch.arange(1, n + 1, dtype=torch.float64)
    # span[i, j-1]: slots of the bucket of experts i..j-1 padded to c[i]; inf where empty
    span = (j[None, :] - i[:, None]) * cnt[:, None]
    span = span.masked_fill(j[None, :] <= i[:, None], float("inf"))
    best = span[0].clone()  # best[j-1]: the first j experts in one bucket
    back = []
    for _ in range(max_buckets - 1):
        prev = torch.cat([best.new_zeros(1), best[:-1]])  # prev[i]: best cost of the first i experts
        cand = prev[:, None] + span
        cand[0] = float("inf")  # a new bucket must start after at least one expert
        val, arg = cand.min(0)
        back.append(torch.where(val < best, arg, torch.full_like(arg, -1)))
        best = torch.minimum(val, best)
    cuts, end = [n], n
    for arg in reversed(back):
        a = int(arg[end - 1])
        if a > 0:
            cuts.append(a)
            end = a
    return [0] + cuts[::-1]


@dataclass(frozen=True)
class Buckets:
    """Dropless slots padded into buckets of experts (see `pad_buckets`), stored bucket after bucket."""

    order: torch.Tensor  # expert ids by load, heaviest first: bucket b is order[e0 : e0 + rows[b]]
    rows: list[int]  # experts per bucket
    caps: list[int]  # slots per expert in each bucket (its heaviest expert's count)
    idx: torch.Tensor  # [S] token of each padded slot (padding: token 0)
    gates: torch.Tensor  # [S] (padding: 0, so padding adds nothing)
    pair_tokens: torch.Tensor  # the routed pairs' tokens, expert-major as the router listed them
    slot_of_pair: torch.Tensor  # each routed pair's padded slot
    bucket_of_pair: torch.Tensor

    def parts(self):
        """Per non-empty bucket: its slots [rows, cap], its experts (a slice of `order`), and its routed
        pairs as (tokens, slot ids within the bucket)."""
        lo = e = 0
        for b, (r, c) in enumerate(zip(self.rows, self.caps)):
            hi = lo + r * c
            if c:
                sel = self.bucket_of_pair == b
                part = Slots(self.idx[lo:hi].view(r, c), self.gates[lo:hi].view(r, c))
                yield part, slice(e, e + r), (self.pair_tokens[sel], self.slot_of_pair[sel] - lo)
            lo, e = hi, e + r


def pad_buckets(slots: Slots, max_buckets: int = 4) -> Buckets:
    """Sorted (dropless) slots -> a few fixed-capacity problems with little padding.

    Padding every expert to the largest count wastes much of the expert matmuls under load
    imbalance, so the experts, ordered by load, are cut into buckets each padded to its heaviest
    expert (far less padding than one bucket for all). Padding slots point at token 0
    with gate 0, so they add nothing.
    """
    counts, idx, gates = slots.counts, slots.idx, slots.gates
    n = counts.numel()
    dev = counts.device
    order = torch.argsort(counts, descending=True, stable=True)
    c = counts[order].tolist()
    cuts = bucket_cuts(c, max_buckets)
    sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    caps = [c[a] for a in cuts[:-1]]
    # per expert (original id): its bucket, its row within the bucket, the bucket's capacity and first slot
    pos = torch.empty(n, dtype=torch.long, device=dev)
    pos[order] = torch.arange(n, device=dev)
    run = torch.bucketize(pos, torch.tensor(cuts[1:-1], dtype=torch.long, device=dev), right=True)
    first = torch.tensor(cuts[:-1], dtype=torch.long, device=dev)
    cap = torch.tensor(caps, dtype=torch.long, device=dev)
    base = torch.cumsum(torch.tensor([0] + [s * k for s, k in zip(sizes, caps)], device=dev), 0)
    starts = torch.cumsum(counts, 0) - counts
    expert = torch.repeat_interleave(torch.arange(n, device=dev), counts)
    rank = torch.arange(idx.numel(), device=dev) - starts[expert]
    r = run[expert]
    dest = base[r] + (pos[expert] - first[r]) * cap[r] + rank  # slot in the concatenated buckets
    total = int(base[-1])
    pidx = idx.new_zeros(total).index_copy(0, dest, idx)
    pg = gates.new_zeros(total).index_copy(0, dest, gates)
    return Buckets(order, sizes, caps, pidx, pg, idx, dest, r)
