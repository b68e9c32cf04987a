"""Training throughput of the real trainer: tokens/s and model FLOPs/s / measured GEMM peak, in one run.

A dense GPT and a fine-grained MoE with the same active size (G=8 by default) train for a few steps
through `finemoe.train.trainer.train`, in interleaved rounds with a 2048^3 fp32 GEMM (bf16 on CUDA),
so the drift of a shared machine hits every side alike. Two utilisations are reported, each
FLOPs/s / GEMM FLOPs/s: `mfu_paper` counts the paper's model FLOPs (6 per active non-embedding weight
per token plus 14 per router weight; it leaves out the output head and attention scores), `mfu` counts
every matmul FLOP the model executes (finemoe.accounting.exact_flops_per_token), which is what a plain
GPT's "fraction of GEMM peak" means. The first step of each round (allocator warm-up) is not timed;
every figure is a median over timed steps (and over GEMM repeats). `--cpu-matmul mkl onednn` trains
each model on both CPU linear paths (finemoe.kernels.cpu_matmul), each divided by its own path's GEMM peak.

    python benchmarks/bench_train.py                    # d_model 256, 4 blocks, seq 256, batch 16
    python benchmarks/bench_train.py --granularity 16 --expansion-rate 16 --json
    python benchmarks/bench_train.py --cpu-matmul mkl onednn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from finemoe.accounting import exact_flops_per_token  # noqa: E402
from finemoe.benchmarks import allocator_settings  # noqa: E402
from finemoe.config import CPU_MATMULS, ModelConfig  # noqa: E402
from finemoe.data.tokens import write_tokens  # noqa: E402
from finemoe.kernels.cpu_matmul import cpu_matmul as linear_path  # noqa: E402
from finemoe.kernels.cpu_matmul import linear  # noqa: E402
from finemoe.train.config import TrainConfig  # noqa: E402
from finemoe.train.trainer import train  # noqa: E402


def gemm_flops(n: int = 2048, reps: int = 3, device: str = "cpu", cpu_matmul: str = "mkl") -> list[float]:
    """FLOP/s of each of `reps` n^3 matmuls: fp32 on CPU (on the given CPU linear path), bf16 on CUDA
    (the dtype training uses)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = []
    with linear_path(cpu_matmul):
        linear(a, b)
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            linear(a, b)
            sync()
            out.append(2 * n**3 / (time.perf_counter() - t0))
    return out


def moe_available() -> str | None:
    """None if the MoE layer imports, else the reason it does not."""
    try:
        import finemoe.nn.moe  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


def models(
    d_model: int, n_blocks: int, seq_len: int, vocab: int, granularity: int, expansion_rate: int
) -> dict:
    dense = ModelConfig(vocab_size=vocab, seq_len=seq_len, d_model=d_model, n_blocks=n_blocks, ffn="dense")
    out = {"dense": dense}
    if moe_available() is None:
        out[f"moe G={granularity}"] = dense.replace(
            ffn="moe", granularity=granularity, expansion_rate=expansion_rate
        )
    return out


def run_steps(
    model: ModelConfig,
    data: Path,
    out: Path,
    batch_size: int,
    steps: int,
    device: str,
    cpu_matmul: str = "mkl",
) -> list[dict]:
    """Per-step metrics of a short real training run (eval and checkpoint only at the end, untimed)."""
    cfg = TrainConfig(
        model=model,
        data_dir=str(data),
        val_file=None,
        out_dir=str(out),
        batch_size=batch_size,
        tokens=steps * batch_size * model.seq_len,
        eval_every=10**9,
        ckpt_every=10**9,
        device=device,
        cpu_matmul=cpu_matmul,
    )
    train(cfg, quiet=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def bench(
    d_model=256,
    n_blocks=4,
    seq_len=256,
    batch_size=16,
    vocab=4096,
    granularity=8,
    expansion_rate=8,
    steps=4,
    rounds=2,
    gemm_n=2048,
    device="cpu",
    cpu_matmuls=("mkl",),
) -> dict:
    """`cpu_matmuls` beyond the first add each model again on that CPU linear path, as "<model> [path]"."""
    base = models(d_model, n_blocks, seq_len, vocab, granularity, expansion_rate)
    cfgs = {
        (k if i == 0 else f"{k} [{path}]"): (m, path)
        for i, path in enumerate(cpu_matmuls)
        for k, m in base.items()
    }
    tok_s: dict[str, list[float]] = {k: [] for k in cfgs}
    flop_s: dict[str, list[float]] = {k: [] for k in cfgs}
    peaks: dict[str, list[float]] = {path: [] for path in cpu_matmuls}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ids = np.random.default_rng(0).integers(0, vocab, (steps + 1) * batch_size * (seq_len + 1) + 1)
        write_tokens(tmp / "train.bin", ids, vocab)
        for r in range(rounds):
            for i, (name, (mcfg, path)) in enumerate(cfgs.items()):
                peaks[path] += gemm_flops(gemm_n, device=device, cpu_matmul=path)
                rows = run_steps(mcfg, tmp, tmp / f"{r}-{i}", batch_size, steps + 1, device, path)
                tok_s[name] += [row["tokens_per_s"] for row in rows[1:]]
                flop_s[name] += [row["flops_per_s"] for row in rows[1:]]
    peak = {path: statistics.median(v) for path, v in peaks.items()}
    result = {
        "device": device if device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "allocator": allocator_settings(),
        "shape": {
            "d_model": d_model,
            "n_blocks": n_blocks,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "vocab": vocab,
            "expansion_rate": expansion_rate,
            "granularity": granularity,
        },
        "gemm_flops_per_s": peak[cpu_matmuls[0]],
        "models": {},
    }
    why = moe_available()
    if why is not None:
        result["skipped"] = f"MoE model skipped: the MoE layer is not importable ({why})"
    for name in cfgs:
        tps = statistics.median(tok_s[name])
        paper = statistics.median(flop_s[name])
        model, path = cfgs[name]
        exact = tps * exact_flops_per_token(model)["total"]
        result["models"][name] = {
            "tokens_per_s": tps,
            "flops_per_s": exact,
            "mfu": exact / peak[path],
            "paper_flops_per_s": paper,
            "mfu_paper": paper / peak[path],
            "timed_steps": len(tok_s[name]),
        }
    if len(base) == 2:
        names = list(base)
        result["moe_over_dense_tokens_per_s"] = (
            result["models"][names[1]]["tokens_per_s"] / result["models"]["dense"]["tokens_per_s"]
        )
    for path in cpu_matmuls[1:]:
        result.setdefault("gemm_flops_per_s_on", {})[path] = peak[path]
        result.setdefault("speedup_over_" + cpu_matmuls[0], {})[path] = {
            k: result["models"][f"{k} [{path}]"]["tokens_per_s"] / result["models"][k]["tokens_per_s"]
            for k in base
        }
    return result


def human(r: dict) -> str:
    s = r["shape"]
    w = max(10, *(len(k) for k in r["models"]))
    lines = [
        f"training throughput, d_model={s['d_model']} blocks={s['n_blocks']} seq={s['seq_len']} "
        f"batch={s['batch_size']} "
        f"vocab={s['vocab']} E={s['expansion_rate']} on {r['device']}, torch {r['torch']}",
        f"allocator: {', '.join(f'{k}={v}' for k, v in r['allocator'].items() if v) or 'glibc defaults'}",
        f"GEMM peak: {r['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s (2048^3 matmul, median of repeats)"
        + "".join(f"; on the {p} path {v / 1e9:.1f}" for p, v in r.get("gemm_flops_per_s_on", {}).items()),
        f"{'model':<{w}} {'tokens/s':>10} {'GFLOP/s':>9} {'/ GEMM peak':>12} {'paper GFLOP/s':>14} "
        f"{'/ GEMM peak':>12}",
    ]
    for name, m in r["models"].items():
        lines.append(
            f"{name:<{w}} {m['tokens_per_s']:>10.0f} {m['flops_per_s'] / 1e9:>9.1f} {m['mfu']:>12.3f} "
            f"{m['paper_flops_per_s'] / 1e9:>14.1f} {m['mfu_paper']:>12.3f}"
        )
    if "skipped" in r:
        lines.append(r["skipped"])
    elif "moe_over_dense_tokens_per_s" in r:
        lines.append(f"MoE / dense tokens/s: {r['moe_over_dense_tokens_per_s']:.3f}")
    for key, per_path in ((k, v) for k, v in r.items() if k.startswith("speedup_over_")):
        for path, per_model in per_path.items():
            ratios = ", ".join(f"{m} {v:.2f}" for m, v in per_model.items())
            lines.append(
                f"tokens/s on the {path} CPU linear path / {key.removeprefix('speedup_over_')}: {ratios}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-blocks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--granularity", "-G", type=int, default=8)
    p.add_argument("--expansion-rate", "-E", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round (plus one untimed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--cpu-matmul",
        nargs="+",
        choices=CPU_MATMULS,
        default=["mkl"],
        help="CPU linear paths to train each model on (finemoe.kernels.cpu_matmul); the first is the "
        "reference",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = bench(
        a.d_model,
        a.n_blocks,
        a.seq_len,
        a.batch_size,
        a.vocab,
        a.granularity,
        a.expansion_rate,
        a.steps,
        a.rounds,
        device=a.device,
        cpu_matmuls=tuple(a.cpu_matmul),
    )
    print(json.dumps(r) if a.json else human(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
