"""The expert computation, batched over all experts at once (no Python loop over experts).

Two layouts of the routed (expert, token) slots:
- fixed capacity [n_experts, C] (Expert Choice): gather the tokens, two `bmm`s, combine per token
  (on fp32 CPU, the fused kernels of finemoe.nn.cpu_kernels where they build; on the opt-in CPU
  oneDNN path, finemoe.nn.linear: the slots stored [C, n_experts] and grouped 1x1 convolutions
  instead of the bmms but for the weight gradients);
- sorted by expert with per-expert counts (Token Choice): two grouped GEMMs (`F.grouped_mm`) on
  GPU; elsewhere (CPU, where grouped_mm runs one mm per expert with a slower backward, or
  unaligned rows) the experts, by load, in a few runs each padded to its heaviest expert (zero
  gates on the padding), stored one after another: one gather, one bmm per run, one combine.

Speed notes (the G-replicated [G*N, d] tensors dominate memory traffic on CPU):
- gather and combine are each the other's backward: index_select, and a per-token segmented sum
  (embedding_bag over the slots sorted by token). Advanced indexing would use
  index_put(accumulate=True) in backward, and index_add_ with unsorted indices, both slower;
- the router gate is applied by the combine's per-slot weights (and by a weighted gather in the
  backward), which pass over the [slots, d] tensors anyway, rather than by a multiply over the
  hidden activations each way; ReLU runs in place on the first matmul's output;
- under autocast the tokens are cast once before the gather, not G times after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finemoe.config import ModelConfig
from finemoe.nn import cpu_kernels
from finemoe.nn.activations import ACT
from finemoe.nn.init import trunc_normal_
from finemoe.nn.linear import conv_linear, onednn_applies
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


class _PermuteExperts(torch.autograd.Function):
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


class BatchedMM:
    """Fixed capacity, expert-major: x [n, C, k] @ w [n, k, o] by bmm."""

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, w)

    def dx(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g, w.transpose(1, 2))

    def dw(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.transpose(1, 2), g)


class GroupedMM:
    """Slots sorted by expert: x [S, k] @ w[g] for the rows of each expert g (offs: cumulative end
    rows, int32), by grouped GEMMs."""

    def __init__(self, offs: torch.Tensor):
        self.offs = offs

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(x, w, offs=self.offs)

    def dx(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(g, w.transpose(1, 2), offs=self.offs)

    def dw(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.grouped_mm(x.t(), g, offs=self.offs)


class RunsMM:
    """Slots in runs of experts, stored run after run: run b holds `rows[b]` experts (consecutive in
    w) with `caps[b]` slots each. x [S, k] @ w[e] per expert as one bmm per run, a fixed handful
    of batched problems each over many experts (Token Choice on CPU, see `_pad_buckets`)."""

    def __init__(self, rows: list[int], caps: list[int]):
        self.rows, self.caps = rows, caps

    def _runs(self):
        s = e = 0
        for r, c in zip(self.rows, self.caps):
            yield slice(s, s + r * c), slice(e, e + r), r, c
            s, e = s + r * c, e + r

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[-1])
        for sl, ex, r, c in self._runs():
            if c:
                torch.bmm(x[sl].view(r, c, -1), w[ex], out=out[sl].view(r, c, -1))
        return out

    def dx(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = g.new_empty(g.shape[0], w.shape[1])
        for sl, ex, r, c in self._runs():
            if c:
                torch.bmm(g[sl].view(r, c, -1), w[ex].transpose(1, 2), out=out[sl].view(r, c, -1))
        return out

    def dw(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(sum(self.rows), x.shape[-1], g.shape[-1])
        for sl, ex, r, c in self._runs():
            if c:
                torch.bmm(x[sl].view(r, c, -1).transpose(1, 2), g[sl].view(r, c, -1), out=out[ex])
            else:
                out[ex].zero_()  # experts no token chose
        return out


class ConvMM:
    """Fixed capacity, capacity-major: x [C, n*k] (slot c of every expert in one row) times w[e] for
    each expert's k columns, as grouped 1x1 convolutions: oneDNN's kernels, faster than MKL's bmm on
    some CPUs (docs/performance.md). The weight gradient stays a bmm (oneDNN's grouped weight
    gradient is slower)."""

    def __init__(self, n_experts: int):
        self.n = n_experts

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, k, o = w.shape
        # detach: not a view of the convolution's 4-D output to autograd, so the ReLU may run in place
        return conv_linear(x, w.transpose(1, 2).reshape(n * o, k), groups=n).detach()

    def dx(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, k, o = w.shape
        return conv_linear(g, w.reshape(n * k, o), groups=n)

    def dw(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        C = x.shape[0]
        return torch.bmm(x.view(C, self.n, -1).permute(1, 2, 0), g.view(C, self.n, -1).transpose(0, 1))


class _ExpertMM(torch.autograd.Function):
    """x @ w per expert in the layout of `mm` (BatchedMM, GroupedMM or ConvMM), with its backward.

    Own backward because the built-in grouped_mm one rejects the broadcast gradients autograd can
    hand it, and convolutions need their weights in another layout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, mm) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.mm = mm
        return mm.fwd(x, w)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g = g.contiguous()
        dx = ctx.mm.dx(g, w) if ctx.needs_input_grad[0] else None
        dw = ctx.mm.dw(x, g) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class _ReLU(torch.autograd.Function):
    """relu in place on a matmul's output (which nothing else keeps), saving only the result; the
    backward masks its gradient, a fresh matmul output consumed only here, in place too."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(a)
        h = a.relu_()
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (h,) = ctx.saved_tensors
        dh = dh.contiguous()
        return torch.ops.aten.threshold_backward(dh, h, 0, grad_input=dh)


def activation(a: torch.Tensor, act) -> torch.Tensor:
    return _ReLU.apply(a) if act is F.relu else act(a)


class _GatedOutput(torch.autograd.Function):
    """out[t] = sum over token t's slots s of gate_s * (h_s @ w2[expert of s]): the second expert
    matmul, with the router gate applied by the combine's per-slot weights.

    Gating there is free (the combine passes over [slots, d] anyway) where gating the hidden
    [slots, d_ff/G] costs a pass each way. The backward gets the gated output gradient from one
    weighted gather, the hidden gradient g * (dy @ w2^T) from the matmul, and the gate gradient
    dy . (h @ w2) = (dy @ w2^T) . h from those, without keeping the [slots, d] outputs.
    `mm` is the layout of h and of the slots (see BatchedMM, GroupedMM, ConvMM); `gates` lists
    the slots in the same order.
    """

    @staticmethod
    def forward(ctx, h, w2, gates, dispatch, mm):
        y = mm.fwd(h, w2)
        ctx.save_for_backward(h, w2, gates)
        ctx.dispatch, ctx.mm = dispatch, mm
        return dispatch.combine(y.view(-1, w2.shape[-1]), gates.reshape(-1))

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h, w2, gates = ctx.saved_tensors
        mm = ctx.mm
        dy = ctx.dispatch.gather(dout.contiguous(), gates.reshape(-1)).view(*h.shape[:-1], -1)
        need_h, need_w, need_g = ctx.needs_input_grad[:3]
        dh = dw2 = dgates = None
        if need_h or need_g:
            dh = mm.dx(dy, w2)
        if need_w:
            dw2 = mm.dw(h, dy)
        if need_g:
            # dh = g * (dy @ w2^T): divide the gate back out. A gate of exactly 0 (underflowed
            # softmax, or padding) gets 0: the softmax backward multiplies it by p = 0 anyway.
            width = w2.shape[-2]  # per slot; no [slots, width] temporary, unlike (dh*h).sum
            dot = torch.einsum("sj,sj->s", dh.view(-1, width), h.view(-1, width)).view(gates.shape)
            dgates = torch.where(gates > 0, dot / gates, 0.0)
        return dh if need_h else None, dw2, dgates, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def fast_path(experts: "Experts", x: torch.Tensor, slots: Slots) -> torch.Tensor:
    """The default kernel: fixed-capacity slots (Expert Choice) or expert-sorted ones (Token Choice),
    each on the fastest path that applies to the tensors at hand."""
    return experts.capacity(x, slots) if slots.counts is None else experts.sorted(x, slots)


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
        # Expert Choice on fp32 CPU runs the fused kernels (finemoe.nn.cpu_kernels) where they
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

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w1.to(dtype), self.w2.to(dtype)

    def capacity(self, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        """x [N, d] (flattened tokens), slots.idx/gates [n, C] -> sum of gated expert outputs [N, d]."""
        idx = slots.idx.reshape(-1)
        if slots.by_token is not None:
            dispatch = Dispatch(idx, *slots.by_token)
        else:
            dispatch = Dispatch.sorting(idx, x.shape[0])
        return self._capacity(x, slots, dispatch)

    def _capacity(
        self,
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
            w1, w2 = weights if weights is not None else self._weights(dtype)
            x = x.to(dtype)
            if onednn_applies(x, w1):  # the CPU oneDNN path (finemoe.nn.linear)
                mm, shape = ConvMM(n), (C, -1)
                dispatch, gates = dispatch.capacity_major(n, C), gates.t()
            elif self.use_cpu_kernels and self.act is F.relu and cpu_kernels.applies(x, w1, n):
                return cpu_kernels.FusedExpertChoice.apply(
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
            h = activation(_ExpertMM.apply(xg, w1, mm), self.act)
            return _GatedOutput.apply(h, w2, gates.to(dtype), dispatch, mm)

    def sorted(self, x: torch.Tensor, slots: Slots) -> torch.Tensor:
        """x [N, d], slots sorted by expert with per-expert counts -> [N, d]."""
        dtype = compute_dtype(x)
        if not self._grouped_ok(x, dtype):
            runs = _pad_buckets(slots)
            with torch.autocast(x.device.type, enabled=False):
                # experts in load order: each run is a contiguous slice
                w1, w2 = (_PermuteExperts.apply(w, runs.order) for w in self._weights(dtype))
            if onednn_applies(x, w1):
                return self._runs_one_by_one(x, runs, w1, w2)
            # routed pairs listed expert by expert, as the router gave them, with their padded slots
            dispatch = Dispatch.sorting(runs.idx, x.shape[0], slots.idx, runs.slot_of_pair)
            with torch.autocast(x.device.type, enabled=False):
                mm = RunsMM(runs.rows, runs.caps)
                xg = gather_rows(x.to(dtype), dispatch)
                h = activation(_ExpertMM.apply(xg, w1, mm), self.act)
                return _GatedOutput.apply(h, w2, runs.gates.to(dtype), dispatch, mm)
        offs = torch.cumsum(slots.counts, 0).to(torch.int32)
        dispatch = Dispatch.sorting(slots.idx, x.shape[0])
        with torch.autocast(x.device.type, enabled=False):
            w1, w2 = self._weights(dtype)
            xs = gather_rows(x.to(dtype), dispatch)
            mm = GroupedMM(offs)
            h = activation(_ExpertMM.apply(xs, w1, mm), self.act)
            return _GatedOutput.apply(h, w2, slots.gates.to(dtype), dispatch, mm)

    def _runs_one_by_one(
        self, x: torch.Tensor, runs: "Runs", w1: torch.Tensor, w2: torch.Tensor
    ) -> torch.Tensor:
        """Each run through the fixed-capacity path on its own (its convolutions need one layout per
        run), the outputs summed."""
        out = None
        for part, e, pairs in runs.parts():
            dispatch = Dispatch.sorting(part.idx.reshape(-1), x.shape[0], *pairs)
            y = self._capacity(x, part, dispatch, weights=(w1[e], w2[e]))
            out = y if out is None else out + y
        return out

    def _grouped_ok(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        """grouped_mm needs 16-byte aligned row strides. On CPU it runs one mm per expert and its
        backward is slower than bmm (docs/performance.md), so the padded bmm path is the default there."""
        if self.use_grouped_mm is False:
            return False
        size = torch.empty((), dtype=dtype).element_size()
        d, w = self.w1.shape[1], self.w1.shape[2]
        if (d * size) % 16 or (w * size) % 16:
            return False
        if self.use_grouped_mm:
            return True
        return (
            x.device.type == "cuda"
            and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )


def _bucket_cuts(c: list[int], max_buckets: int) -> list[int]:
    """Cut points of the descending counts `c` into at most `max_buckets` runs, each padded to its
    first (largest) count, minimising the total padded slots (exact DP, vectorised over the cut)."""
    n = len(c)
    cnt = torch.tensor(c, dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    j = torch.arange(1, n + 1, dtype=torch.float64)
    # span[i, j-1]: slots of the run of experts i..j-1 padded to c[i]; inf where empty
    span = (j[None, :] - i[:, None]) * cnt[:, None]
    span = span.masked_fill(j[None, :] <= i[:, None], float("inf"))
    best = span[0].clone()  # best[j-1]: the first j experts in one run
    back = []
    for _ in range(max_buckets - 1):
        prev = torch.cat([best.new_zeros(1), best[:-1]])  # prev[i]: best cost of the first i experts
        cand = prev[:, None] + span
        cand[0] = float("inf")  # a new run must start after at least one expert
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
class Runs:
    """Dropless slots padded into runs of experts (see `_pad_buckets`), stored run after run."""

    order: torch.Tensor  # expert ids by load, heaviest first: run b is order[e0 : e0 + rows[b]]
    rows: list[int]  # experts per run
    caps: list[int]  # slots per expert in each run (its heaviest expert's count)
    idx: torch.Tensor  # [S] token of each padded slot (padding: token 0)
    gates: torch.Tensor  # [S] (padding: 0, so padding adds nothing)
    pair_tokens: torch.Tensor  # the routed pairs' tokens, expert-major as the router listed them
    slot_of_pair: torch.Tensor  # each routed pair's padded slot
    run_of_pair: torch.Tensor

    def parts(self):
        """Per non-empty run: its slots [rows, cap], its experts (a slice of `order`), and its routed
        pairs as (tokens, slot ids within the run)."""
        lo = e = 0
        for b, (r, c) in enumerate(zip(self.rows, self.caps)):
            hi = lo + r * c
            if c:
                sel = self.run_of_pair == b
                part = Slots(self.idx[lo:hi].view(r, c), self.gates[lo:hi].view(r, c))
                yield part, slice(e, e + r), (self.pair_tokens[sel], self.slot_of_pair[sel] - lo)
            lo, e = hi, e + r


def _pad_buckets(slots: Slots, max_buckets: int = 4) -> Runs:
    """Sorted (dropless) slots -> a few fixed-capacity problems with little padding.

    (A fixed loop of at most `max_buckets` batched problems, each over many experts.)

    Padding every expert to the largest count wastes a third of the expert matmuls at a typical load
    imbalance, so the experts, ordered by load, are cut into runs each padded to its heaviest
    expert (about 4% padding with 4 runs where one run has 25-40%). Padding slots point at token 0
    with gate 0, so they add nothing.
    """
    counts, idx, gates = slots.counts, slots.idx, slots.gates
    n = counts.numel()
    dev = counts.device
    order = torch.argsort(counts, descending=True, stable=True)
    c = counts[order].tolist()
    cuts = _bucket_cuts(c, max_buckets)
    sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
    caps = [c[a] for a in cuts[:-1]]
    # per expert (original id): its run, its row within the run, the run's capacity and first slot
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
    dest = base[r] + (pos[expert] - first[r]) * cap[r] + rank  # slot in the concatenated runs
    total = int(base[-1])
    pidx = idx.new_zeros(total).index_copy(0, dest, idx)
    pg = gates.new_zeros(total).index_copy(0, dest, gates)
    return Runs(order, sizes, caps, pidx, pg, idx, dest, r)
