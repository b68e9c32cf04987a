"""`finemoe bench moe-layer` (MoE layer over a dense FFN) and `finemoe bench calibrate` (the cost model)."""

from __future__ import annotations

import argparse
import os
import sys

from finemoe.commands.common import add_json_flag, emit, nonnegative_int, positive_int
from finemoe.config import CPU_MATMULS
from finemoe.errors import ConfigError

# glibc hands large temporaries back to the OS after every step unless told otherwise, and the page
# faults then cost more than the MoE arithmetic; these are the settings the Makefile exports.
GLIBC_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
    # transparent huge pages for the heap (glibc >= 2.35, ignored elsewhere): far fewer page faults
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}
# With more runnable threads than cores (a shared machine), OpenMP workers spinning at the end of
# every parallel region steal the cores their peers need: a 2-thread MoE step with its many small
# ops runs markedly slower than with sleeping workers (docs/performance.md), a dense FFN (six large
# GEMMs) hardly changes. Applied to both sides; on a quiet machine the cost is a few microseconds per region.
OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
REEXEC_MARK = "FINEMOE_BENCH_REEXEC"


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks measured side by side in one run")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    m = bsub.add_parser("moe-layer", help="MoE layer fwd+bwd time / dense FFN of equal active FLOPs")
    m.add_argument(
        "--granularities",
        "-G",
        type=positive_int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="granularities to time (default 1 2 4 8 16)",
    )
    m.add_argument("--d-model", type=positive_int, default=512, help="layer width (default 512)")
    m.add_argument("--expansion-rate", "-E", type=positive_int, default=16, help="E (default 16)")
    m.add_argument("--batch", type=positive_int, default=32, help="sequences per step (default 32)")
    m.add_argument("--seq", type=positive_int, default=256, help="tokens per sequence (default 256)")
    m.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per layer (median reported)")
    m.add_argument(
        "--warmup", type=positive_int, default=2, help="untimed rounds first (allocator heap growth)"
    )
    m.add_argument(
        "--settle",
        type=nonnegative_int,
        default=8,
        help="at most this many more untimed rounds while a round still page-faults (0: exactly --warmup)",
    )
    m.add_argument(
        "--routing",
        nargs="+",
        choices=["ec", "tc"],
        default=["ec", "tc"],
        help="expert choice and/or token choice (default both)",
    )
    m.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    m.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    m.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 runs under autocast")
    m.add_argument(
        "--cpu-matmul",
        choices=CPU_MATMULS,
        default="mkl",
        help="fp32 CPU matmuls of both sides (dense FFN; router, experts): torch's MKL or oneDNN "
        "(finemoe.kernels.cpu_matmul)",
    )
    m.add_argument(
        "--breakdown",
        action="store_true",
        help="also time every op of a few extra steps and split each layer's step by op kind",
    )
    m.add_argument(
        "--no-reexec",
        action="store_true",
        help="do not restart with glibc malloc thresholds raised and OMP_WAIT_POLICY=PASSIVE when unset",
    )
    add_json_flag(m)
    m.set_defaults(func=run_moe_layer)

    c = bsub.add_parser(
        "calibrate",
        help="time training steps of dense and MoE blocks on this device and fit the planner's cost model",
    )
    c.add_argument("--out", required=True, metavar="FILE.json", help="where the calibration goes")
    c.add_argument("--quick", action="store_true", help="a small grid: a minute or two on a CPU")
    c.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    c.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    c.add_argument("--routing", choices=["ec", "tc"], default="ec", help="the MoE blocks' routing (ec)")
    c.add_argument("--repeats", type=positive_int, default=3, help="timed steps per point (median)")
    add_json_flag(c)
    c.set_defaults(func=run_calibrate)


def _allocator_tuned() -> bool:
    return all(k in os.environ for k in GLIBC_MALLOC) or "LD_PRELOAD" in os.environ


def _missing_env() -> dict[str, str]:
    """Bench settings not yet in the environment (a user's own values always win)."""
    want = dict(OMP_ENV) if _allocator_tuned() else {**GLIBC_MALLOC, **OMP_ENV}
    return {k: v for k, v in want.items() if k not in os.environ}


def _maybe_reexec(args: argparse.Namespace) -> None:
    """Restart the process with the Makefile's malloc settings and sleeping OpenMP workers (both
    read at startup), so a bare `finemoe bench` measures the same thing as `make bench`; only for a
    real command line (never inside another program)."""
    missing = _missing_env()
    if args.no_reexec or not missing or os.environ.get(REEXEC_MARK):
        return
    if sys.argv[1:3] != ["bench", "moe-layer"]:
        names = ", ".join(missing)
        print(f"finemoe bench: warning: {names} unset; ratios may be distorted", file=sys.stderr)
        return
    env = {**os.environ, **missing, REEXEC_MARK: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "finemoe", *sys.argv[1:]], env)


def run_moe_layer(args: argparse.Namespace) -> int:
    from finemoe.config import ModelConfig

    for g in args.granularities:  # fail on a bad shape before any timing
        ModelConfig(d_model=args.d_model, expansion_rate=args.expansion_rate, granularity=g, seq_len=args.seq)
    _maybe_reexec(args)

    import torch

    from finemoe.benchmarks.moe_layer import bench_moe_layer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda given but CUDA is not available; use --device cpu")
    out = bench_moe_layer(
        granularities=tuple(args.granularities),
        d_model=args.d_model,
        expansion_rate=args.expansion_rate,
        batch=args.batch,
        seq=args.seq,
        repeats=args.repeats,
        warmup=args.warmup,
        settle=args.settle,
        routings=tuple(args.routing),
        device=args.device,
        dtype=torch.bfloat16 if args.dtype == "bf16" else None,
        cpu_matmul=args.cpu_matmul,
        breakdown=args.breakdown,
    )
    emit(args, out, _human)
    return 0


def _human(o: dict) -> str:
    s = o["shape"]
    routings = list(o["ratios"])
    path = f" ({o['cpu_matmul']} matmuls)" if o["device"] == "cpu" else ""
    head = f"{'G':>3}  {'dense ms':>9}" + "".join(
        f"  {r + ' ms':>9}  {r + '/dense':>9}  {'p25-p75':>9}  {'floor':>5}" for r in routings
    )
    lines = [
        f"MoE layer fwd+bwd / dense FFN, d_model={s['d_model']} E={s['expansion_rate']} "
        f"tokens={s['batch']}x{s['seq']}, {o['device']} {o['dtype']}{path}, {o['threads']} threads, "
        f"median of {o['repeats']} paired rounds",
        head,
    ]
    for g in o["ms"]["dense"]:
        row = f"{g:>3}  {o['ms']['dense'][g]:9.1f}"
        for r in routings:
            lo, hi = o["ratio_p25_p75"][r][g]
            row += f"  {o['ms'][r][g]:9.1f}  {o['ratios'][r][g]:9.2f}  {f'{lo:.2f}-{hi:.2f}':>9}"
            row += f"  {o['matmul_floor'][r][g]:5.2f}"
        lines.append(row)
    lines.append("floor: the ratio if only the matmuls (experts and router, fwd+bwd) took time")
    alloc = ", ".join(f"{k}={v}" for k, v in o["allocator"].items() if v is not None) or "glibc defaults"
    lines.append(f"allocator: {alloc}; OMP_WAIT_POLICY={o.get('omp_wait_policy') or 'unset'}")
    warm = " ".join(f"G={g}: {n}" for g, n in o["warmup_rounds"].items())
    lines.append(f"untimed warm-up rounds (until the heap stopped growing): {warm}")
    if "breakdown_ms" in o:
        lines += ["", *_breakdown_table(o["breakdown_ms"])]
    return "\n".join(lines)


def _breakdown_table(split: dict) -> list[str]:
    first = next(iter(split.values()))
    kinds = list(next(iter(first.values())))
    lines = [
        "ms per op kind in one step with every op timed (expert matmuls: bmm / grouped GEMMs / grouped "
        "convolutions / the fused CPU kernels, gathers included; other matmuls: the router, or the dense "
        "FFN itself)",
        f"{'G':>3}  {'layer':<6}{'step':>8}" + "".join(f"  {k:>14}" for k in kinds),
    ]
    for g in first:
        for layer, per_g in split.items():
            b = per_g[g]
            lines.append(
                f"{g:>3}  {layer:<6}{sum(b.values()):8.1f}" + "".join(f"  {b[k]:14.1f}" for k in kinds)
            )
    return lines


def run_calibrate(args: argparse.Namespace) -> int:
    from finemoe.commands.common import check_outputs

    check_outputs(args.out)
    import torch

    from finemoe.benchmarks import calibrate as bench
    from finemoe.io import write_json_atomic
    from finemoe.scaling.cost_model import calibrate

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = bench.QUICK if args.quick else bench.FULL
    quiet = args.json or not sys.stderr.isatty()
    points = bench.measure(
        spec,
        args.device,
        args.routing,
        args.repeats,
        progress=None if quiet else lambda s: print(s, file=sys.stderr),
    )
    out = {
        **calibrate(points),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "routing": args.routing,
        "grid": "quick" if args.quick else "full",
        "points": points,
    }
    write_json_atomic(args.out, out)
    emit(args, {k: v for k, v in out.items() if k != "points"} | {"out": args.out}, _calibration_text)
    return 0


def _calibration_text(o: dict) -> str:
    theta = ", ".join(f"{k} {v:.3g}" for k, v in o["coefficients"].items())
    err = o["holdout_error"]
    return (
        f"wrote {o['out']}: {o['fit_points'] + o['holdout_points']} blocks timed on {o['device']} "
        f"({o['threads']} threads)\n{o['model']}\n  {theta}\n"
        f"held-out error: mean {err:.1%}, max {o['holdout_max_error']:.1%} over {o['holdout_points']} points"
    )
