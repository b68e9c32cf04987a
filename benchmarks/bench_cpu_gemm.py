"""How much of this CPU's fp32 matmul speed torch's default path uses: MKL (nn.Linear, bmm) against
oneDNN's kernels reached through 1x1 convolutions, side by side in one run.

`finemoe bench moe-layer` divides by a dense FFN built on nn.Linear, i.e. on torch's MKL sgemm. On some
CPUs oneDNN's JIT kernels run the same fp32 matmuls much faster (measured on an AVX-512 AMD EPYC:
about twice), so there the layer ratios are relative to a dense FFN that could itself be faster, and
read differently. This benchmark measures, at the layer benchmark's shapes:
- dense FFN fwd+bwd: two linear maps and a ReLU, as nn.Linear and as 1x1 convolutions over
  channels-last views of the same tensors (no copies; autograd's own convolution backward);
- one expert matmul x[n, C, d] @ w1[n, d, w] (n = E*G experts, capacity C = tokens/E), fwd and fwd+bwd,
  as the MoE layer runs it on each path: bmm, or a grouped 1x1 convolution over tokens stored
  capacity-major ([C, n, d], which the gather produces at no cost) with its weight gradient by bmm.
Both sides compute in fp32 and are checked to agree (max error relative to the largest entry).
Rounds are interleaved and each ratio is the median of per-round ratios.

    python benchmarks/bench_cpu_gemm.py [--d-model 512] [--tokens 8192] [--granularity 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from finemoe.benchmarks import allocator_settings  # noqa: E402
from finemoe.config import CPU_MATMULS  # noqa: E402
from finemoe.kernels.cpu_matmul import conv_linear  # noqa: E402
from finemoe.kernels.expert_mm import BatchedMM, ConvMM, ExpertMM  # noqa: E402


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


SIDES = CPU_MATMULS  # (MKL, oneDNN): the order _Case.fns follows


@dataclass
class _Case:
    """One op done both ways: `fns` (MKL, oneDNN) with their output gradients `dys` and the `leaves`
    they differentiate; `to_mkl` maps the oneDNN side's output, then each gradient, to MKL's layout."""

    name: str
    fns: tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]
    dys: tuple[torch.Tensor, torch.Tensor]
    leaves: tuple[list[torch.Tensor], list[torch.Tensor]]
    to_mkl: list[Callable[[torch.Tensor], torch.Tensor]]
    backward: bool = True

    def run(self, side: int) -> list[torch.Tensor]:
        """The output, or with `backward` the leaves' gradients."""
        if not self.backward:
            with torch.no_grad():
                return [self.fns[side]()]
        for t in self.leaves[side]:
            t.grad = None
        self.fns[side]().backward(self.dys[side])
        return [t.grad for t in self.leaves[side]]

    def error(self) -> float:
        """Max relative error of the oneDNN side against MKL's (output, or gradients)."""
        maps = self.to_mkl[:1] if not self.backward else self.to_mkl[1:]
        return max(_rel_err(a, m(b)) for a, b, m in zip(self.run(0), self.run(1), maps))


def _cases(d_model: int, tokens: int, granularity: int, expansion_rate: int) -> list[_Case]:
    d, f = d_model, 4 * d_model
    if f % granularity or tokens % expansion_rate:
        raise ValueError("4*d_model must be a multiple of the granularity and tokens of the expansion rate")
    n, w, C = expansion_rate * granularity, f // granularity, tokens // expansion_rate
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    def twin(t):
        return t.detach().clone().requires_grad_()

    x, w1, w2 = leaf(tokens, d), leaf(f, d, scale=d**-0.5), leaf(d, f, scale=f**-0.5)
    x_, w1_, w2_ = twin(x), twin(w1), twin(w2)
    dy = torch.randn(tokens, d, generator=g)

    def same(v):
        return v

    dense = _Case(
        "dense FFN fwd+bwd",
        (
            lambda: F.linear(F.relu(F.linear(x, w1)), w2),
            lambda: conv_linear(F.relu(conv_linear(x_, w1_)), w2_),
        ),
        (dy, dy),
        ([x, w1, w2], [x_, w1_, w2_]),
        [same] * 4,
    )
    xe, we = leaf(n, C, d), leaf(n, d, w, scale=d**-0.5)  # expert-major tokens for bmm
    xc = xe.detach().transpose(0, 1).contiguous().requires_grad_()  # [C, n, d] for the convolution
    wc = twin(we)
    dye = torch.randn(n, C, w, generator=g)
    # the layer's own two paths: bmm, and grouped convolutions with the weight gradient by bmm
    fns = (
        lambda: ExpertMM.apply(xe, we, BatchedMM()),
        lambda: ExpertMM.apply(xc.view(C, n * d), wc, ConvMM(n)),
    )
    expert = dict(
        fns=fns,
        dys=(dye, dye.transpose(0, 1).reshape(C, n * w)),
        leaves=([xe, we], [xc, wc]),
        to_mkl=[lambda v: v.view(C, n, w).transpose(0, 1), lambda v: v.transpose(0, 1), same],
    )
    return [
        dense,
        _Case(f"expert matmul fwd (n={n}, C={C}, {d}x{w})", **expert, backward=False),
        _Case("expert matmul fwd+bwd", **expert),
    ]


def bench(
    d_model: int = 512,
    tokens: int = 8192,
    granularity: int = 16,
    expansion_rate: int = 16,
    repeats: int = 7,
    warmup: int = 2,
) -> dict:
    cases = _cases(d_model, tokens, granularity, expansion_rate)
    rows = {}
    for case in cases:
        err = case.error()
        times: dict[str, list[float]] = {s: [] for s in SIDES}
        for i in range(warmup + repeats):
            for side, name in enumerate(SIDES):
                t0 = time.perf_counter()
                case.run(side)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        rows[case.name] = {
            "mkl_ms": statistics.median(times["mkl"]) * 1e3,
            "onednn_ms": statistics.median(times["onednn"]) * 1e3,
            "speedup": statistics.median(a / b for a, b in zip(times["mkl"], times["onednn"])),
            "max_rel_err": err,
        }
    return {
        "cases": rows,
        "shape": {
            "d_model": d_model,
            "tokens": tokens,
            "granularity": granularity,
            "expansion_rate": expansion_rate,
        },
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "allocator": allocator_settings(),
    }


def human(r: dict) -> str:
    s = r["shape"]
    lines = [
        "fp32 matmuls on this CPU, MKL (nn.Linear / bmm) vs oneDNN (1x1 convolution), "
        f"d_model={s['d_model']} "
        f"tokens={s['tokens']} G={s['granularity']} E={s['expansion_rate']}, {r['threads']} threads, "
        f"median of {r['repeats']} paired rounds",
        f"  {'':44s} {'mkl ms':>8s} {'onednn ms':>10s} {'mkl/onednn':>11s} {'max rel err':>12s}",
    ]
    for name, c in r["cases"].items():
        lines.append(
            f"  {name:44s} {c['mkl_ms']:8.1f} {c['onednn_ms']:10.1f} {c['speedup']:11.2f} "
            f"{c['max_rel_err']:12.1e}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--granularity", "-G", type=int, default=16)
    ap.add_argument("--expansion-rate", "-E", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        r = bench(args.d_model, args.tokens, args.granularity, args.expansion_rate, args.repeats)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(r) if args.json else human(r))


if __name__ == "__main__":
    main()
