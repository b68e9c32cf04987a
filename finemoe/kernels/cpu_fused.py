"""Fused Expert Choice experts for fp32 CPU: C++ kernels (csrc/expert_kernels.cpp), built on first use.

Why: unfused, the Expert Choice experts write [n_experts, C, d] copies of the tokens (the tokens
gathered, the output gradient gathered, the input gradient per slot), G times the token tensor,
and read each back from memory in two batched matmuls; at G=16 that traffic is most of the layer's
excess over a dense FFN. The kernels gather each expert's block into a per-thread tile that stays in
cache for the matmuls reading it, and gather the tokens again in the backward rather than keeping
them (a fifth of the unfused path's activation memory; docs/performance.md). The matmuls are
MKL's sgemm, the one torch's bmm runs, so a dense layer and the MoE layer still share their GEMM.

torch.utils.cpp_extension compiles them the first time a process needs them (then cached on disk,
rebuilt when the source changes). Where that cannot work (no C++ compiler, a torch
built without MKL, or FINEMOE_CPU_KERNELS=0 in the environment) the layer runs its unfused PyTorch
path, with one warning saying why when a build was tried and failed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from pathlib import Path

import torch

ENV = "FINEMOE_CPU_KERNELS"
SOURCE = Path(__file__).with_name("csrc") / "expert_kernels.cpp"


def build_folder() -> Path:
    """Named by the source's hash and the ABI it builds for, so that every checkout of the same kernels
    shares one build and checkouts of different ones never rebuild each other."""
    import hashlib

    from torch.utils.cpp_extension import get_default_build_root

    key = SOURCE.read_bytes() + f"{torch.__version__} {sys.version_info[:2]}".encode()
    return Path(get_default_build_root()) / f"finemoe_cpu_kernels_{hashlib.sha256(key).hexdigest()[:12]}"


def _build() -> None:
    """Build in `build_folder()`, from a copy of the source kept there."""
    import shutil

    from torch.utils.cpp_extension import load

    folder = build_folder()
    name = folder.name
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / SOURCE.name
    if not source.is_file():
        tmp = folder / f".{SOURCE.name}.{os.getpid()}.tmp"
        shutil.copyfile(SOURCE, tmp)
        os.replace(tmp, source)  # another process building at the same time never reads half a file
    with _build_lock(folder):
        load(
            name,
            [str(source)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            is_python_module=False,
        )


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One builder at a time, under a lock the kernel drops when its holder dies.

    torch's own build lock is a file that a killed builder leaves behind, and every later process then
    waits on it forever. Under this lock no other finemoe process is building here, so a torch lock
    file found in the folder is such a leftover and is removed (a builder of an older finemoe, which
    takes no such lock, could still be holding it: then two builds race, as before this lock).
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's lock alone, leftovers and all
        yield
        return
    with open(folder / ".finemoe-build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@functools.cache
def available() -> bool:
    """Whether the fused kernels are loaded in this process (building them if needed)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkl.is_available():  # the kernels call MKL's sgemm inside torch
        return False
    try:
        _build()
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use the unfused path
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(
            f"fused CPU expert kernels unavailable ({first[:200]}); Expert Choice runs its unfused "
            f"path. Install a C++ compiler with OpenMP, or set {ENV}=0 to stop trying.",
            stacklevel=2,
        )
        return False
    return True


def applies(x: torch.Tensor, w1: torch.Tensor, n_experts: int) -> bool:
    """fp32 CPU with enough experts to keep every thread busy: the kernels split the experts over
    torch's threads and run one single-threaded sgemm per expert, where bmm threads each product."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w1.dtype == torch.float32
        and n_experts >= 4 * torch.get_num_threads()
        and available()
    )


class FusedExpertChoice(torch.autograd.Function):
    """out = combine over slots of gates * (relu(x[idx] @ w1) @ w2), with the fused kernels.

    idx/gates [n, C] (expert-major fixed capacity); `dispatch` has the combine (per-token segmented
    sum, finemoe.kernels.dispatch.Dispatch). The forward's first matmul gathers in tiles; the second and
    the combine are bmm and embedding_bag as on the unfused path. The backward is one kernel for
    all four matmuls and the gate gradient, then the combine of the input gradient.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, gates, idx, dispatch):
        h = torch.ops.finemoe_cpu.gather_mm(x, idx, w1).relu_()
        y = torch.bmm(h, w2)
        ctx.save_for_backward(x, w1, w2, gates, idx, h)
        ctx.dispatch = dispatch
        return dispatch.combine(y.view(-1, y.shape[-1]), gates.reshape(-1))

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, gates, idx, h = ctx.saved_tensors
        dxs, dw1, dw2, dgates = torch.ops.finemoe_cpu.expert_backward(
            x, idx, gates, w1, w2, h, dout.contiguous()
        )
        dx = ctx.dispatch.combine(dxs.view(-1, x.shape[1])) if ctx.needs_input_grad[0] else None
        return dx, dw1, dw2, dgates, None, None
