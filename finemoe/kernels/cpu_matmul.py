"""Linear maps with an opt-in fp32 CPU path through oneDNN.

torch's nn.Linear runs on MKL's sgemm on CPU. On some CPUs oneDNN's JIT kernels, which torch uses for
convolutions, run the same fp32 products up to twice as fast (docs/performance.md; check a machine
with `python benchmarks/bench_cpu_gemm.py`). A linear map is a 1x1
convolution whose spatial axis is the rows, and in channels-last memory that view of a [rows, k]
tensor is free, so `linear` reaches those kernels with torch's own convolution backward.

The path is off by default (`mkl`: torch's behaviour) and is chosen per process, like
torch.backends flags, because it is a property of the machine, not of the model: `set_cpu_matmul`
or the `cpu_matmul(...)` context (the trainer's `cpu_matmul` setting). It applies to fp32 CPU
tensors outside autocast with more than one torch thread (with one, torch runs 1x1 convolutions
on a slower non-oneDNN kernel); everything else goes to F.linear. The experts' fixed-capacity
matmuls follow the same switch (finemoe.kernels.expert_mm.ConvMM: grouped convolutions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from finemoe.config import CPU_MATMULS

_cpu_matmul = "mkl"


def set_cpu_matmul(name: str) -> str:
    """Select the fp32 CPU path of `linear`; returns the previous one."""
    global _cpu_matmul
    if name not in CPU_MATMULS:
        raise ValueError(f"cpu_matmul must be one of {CPU_MATMULS}, got {name!r}")
    previous, _cpu_matmul = _cpu_matmul, name
    return previous


def get_cpu_matmul() -> str:
    return _cpu_matmul


@contextlib.contextmanager
def cpu_matmul(name: str) -> Iterator[None]:
    previous = set_cpu_matmul(name)
    try:
        yield
    finally:
        set_cpu_matmul(previous)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight)` (and the experts' matmuls) take the oneDNN path."""
    return (
        _cpu_matmul == "onednn"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and torch.get_num_threads() > 1
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def conv_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1
) -> torch.Tensor:
    """x [rows, groups*k] -> [rows, groups*o]: each group g of k columns times weight[g*o:(g+1)*o]^T
    (weight [groups*o, k]), as a 1x1 convolution whose spatial axis is the rows; for a contiguous x
    the channels-last views cost nothing."""
    rows, k = x.shape
    o = weight.shape[0]
    x4 = x.contiguous().view(1, rows, 1, k).permute(0, 3, 1, 2)
    y = F.conv2d(x4, weight.reshape(o, k // groups, 1, 1), bias, groups=groups)
    return y.permute(0, 2, 3, 1).reshape(rows, o)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the selected CPU path."""
    if not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    y = conv_linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) on the selected CPU path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
