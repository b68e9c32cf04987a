"""Where a layer's fwd+bwd time goes: every aten op timed and put in one of a few kinds.

A TorchDispatchMode sees each op below autograd, backward ones included, and none of the ops an op
calls inside itself, so the kinds add up to the step without double counting and without the
profiler's own start-up. On CUDA every op is synchronised on both sides, which serialises the
stream: the split is right, the total is slower than a real step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

KINDS = ("expert matmuls", "other matmuls", "gather/combine", "other ops", "unattributed")

_MATMULS = {"mm", "addmm", "addbmm"}
# the fused CPU kernels (finemoe.kernels.cpu_fused) count here with the gathers inside them
_EXPERT_MATMULS = {"bmm", "baddbmm", "_grouped_mm", "gather_mm", "expert_backward"}
_CONVOLUTIONS = {"convolution", "_convolution", "convolution_backward", "mkldnn_convolution"}
_GATHERS = {
    "index_select",
    "index",
    "index_put",
    "index_put_",
    "index_add",
    "index_add_",
    "gather",
    "scatter",
    "scatter_",
    "scatter_add",
    "scatter_add_",
    "embedding_bag",
    "_embedding_bag",
    "_embedding_bag_forward_only",
    "_embedding_bag_backward",
    "_embedding_bag_dense_backward",
    "_embedding_bag_per_sample_weights_backward",
}


def _argument(func, args: tuple, kwargs: dict, name: str):
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name, a.default_value)
    return None


def op_kind(func, args: tuple = (), kwargs: dict | None = None) -> str:
    """The kind of one aten op. Expert matmuls are the batched and grouped products, grouped
    convolutions (the experts on the oneDNN path) and the fused CPU kernels; other matmuls are the
    router's and the dense FFN's (mm, addmm, or ungrouped 1x1 convolutions on the oneDNN path)."""
    name = func.overloadpacket.__name__
    if name in _CONVOLUTIONS:
        groups = _argument(func, args, kwargs or {}, "groups")
        return "expert matmuls" if groups not in (None, 1) else "other matmuls"
    if name in _EXPERT_MATMULS:
        return "expert matmuls"
    if name in _MATMULS:
        return "other matmuls"
    return "gather/combine" if name in _GATHERS else "other ops"


class OpTimer(TorchDispatchMode):
    """Seconds per op kind while active. `sync` waits for the device (a no-op on CPU)."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        super().__init__()
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.sync()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        self.sync()
        self.seconds[op_kind(func, args, kwargs)] += time.perf_counter() - t0
        return out


def step_breakdown(step: Callable[[], None], sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Milliseconds of one call of `step` per kind of KINDS; 'unattributed' is the wall time no op
    accounts for (Python, the autograd engine, the timer itself)."""
    timer = OpTimer(sync)
    sync()
    t0 = time.perf_counter()
    with timer:
        step()
    sync()
    wall = time.perf_counter() - t0
    out = {k: timer.seconds.get(k, 0.0) * 1e3 for k in KINDS[:-1]}
    out["unattributed"] = max(0.0, wall * 1e3 - sum(out.values()))
    return out
