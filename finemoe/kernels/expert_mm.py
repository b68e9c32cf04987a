"""The experts' two matmuls in each slot layout, with their backward, the in-place ReLU and the gated output.

Layouts: fixed capacity expert-major [n, C, k] (`BatchedMM`), capacity-major for oneDNN's grouped
convolutions (`ConvMM`), sorted by expert for grouped GEMMs (`GroupedMM`), and buckets of padded
experts (`BucketsMM`). The router gate is applied by the combine's per-slot weights (and by a
weighted gather in the backward), which pass over the [slots, d] tensors anyway, rather than by a
multiply over the hidden activations each way; ReLU runs in place on the first matmul's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finemoe.kernels.cpu_matmul import conv_linear


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


class BucketsMM:
    """Slots in buckets of experts, stored bucket after bucket: bucket b holds `rows[b]` experts
    (consecutive in w) with `caps[b]` slots each. x [S, k] @ w[e] per expert as one bmm per bucket, a
    fixed handful of batched problems each over many experts (Token Choice on CPU, see `pad_buckets`)."""

    def __init__(self, rows: list[int], caps: list[int]):
        self.rows, self.caps = rows, caps

    def _buckets(self):
        s = e = 0
        for r, c in zip(self.rows, self.caps):
            yield slice(s, s + r * c), slice(e, e + r), r, c
            s, e = s + r * c, e + r

    def fwd(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[-1])
        for sl, ex, r, c in self._buckets():
            if c:
                torch.bmm(x[sl].view(r, c, -1), w[ex], out=out[sl].view(r, c, -1))
        return out

    def dx(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = g.new_empty(g.shape[0], w.shape[1])
        for sl, ex, r, c in self._buckets():
            if c:
                torch.bmm(g[sl].view(r, c, -1), w[ex].transpose(1, 2), out=out[sl].view(r, c, -1))
        return out

    def dw(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(sum(self.rows), x.shape[-1], g.shape[-1])
        for sl, ex, r, c in self._buckets():
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


class ExpertMM(torch.autograd.Function):
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


class InplaceReLU(torch.autograd.Function):
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
    return InplaceReLU.apply(a) if act is F.relu else act(a)


class GatedOutput(torch.autograd.Function):
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
