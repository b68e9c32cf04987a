"""`finemoe plan`: the compute-optimal fine-grained MoE for a FLOPs budget, or the paper's Table 2; with
--search-e or --law joint also the expansion rate E under a memory cap (docs/choosing-e.md)."""

from __future__ import annotations

import argparse
import math

from finemoe.commands.common import (
    add_json_flag,
    check_outputs,
    emit,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from finemoe.config import ModelConfig
from finemoe.scaling.memory import PRECISIONS
from finemoe.units import count


def add_law_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `plan` and `savings`: which coefficients and which FLOPs model."""
    p.add_argument(
        "--coefficients",
        default="paper",
        metavar="NAME|FILE.json",
        help="paper (Table 1, default), paper-precise, paper-holdout, paper-e16, "
        "or a `finemoe fit --out` file",
    )
    p.add_argument(
        "--expansion-rate",
        "-E",
        type=positive_int,
        default=None,
        help="E (default: the coefficient set's, 64 for the paper's)",
    )
    p.add_argument("--c-f", type=positive_float, default=6.0, help="FLOPs per active parameter per token (6)")
    p.add_argument(
        "--c-r",
        type=nonnegative_float,
        default=14.0,
        help="routing FLOPs per router weight per token (14; paper: 6..20)",
    )
    p.add_argument("--aspect", type=positive_float, default=64.0, help="d_model / n_blocks (64, the paper's)")
    p.add_argument(
        "--granularities",
        default="1,2,4,8,16,32,64,128,256",
        help="comma-separated G values searched (default powers of two 1..256)",
    )
    p.add_argument(
        "--continuous-g",
        action="store_true",
        help="optimise G as a real number between the smallest and largest --granularities",
    )
    p.add_argument(
        "--max-total-params",
        type=positive_float,
        default=None,
        metavar="N",
        help="cap on total non-embedding params (memory), for every model compared, e.g. 10e9",
    )
    p.add_argument(
        "--max-active-params",
        type=positive_float,
        default=None,
        metavar="N",
        help="cap on active params (inference cost per token), for every model compared",
    )


def load_law_args(args: argparse.Namespace):
    from finemoe.errors import ConfigError
    from finemoe.scaling.laws import load_coefficients
    from finemoe.scaling.plan import Settings

    coeffs = load_coefficients(args.coefficients)
    try:
        gs = tuple(float(x) for x in args.granularities.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--granularities must be comma-separated numbers >= 1, got {args.granularities!r}"
        ) from None
    E = args.expansion_rate or coeffs.expansion_rate
    s = Settings(
        expansion_rate=E,
        c_f=args.c_f,
        c_r=args.c_r,
        aspect=args.aspect,
        granularities=gs,
        continuous_g=args.continuous_g,
        max_total_params=args.max_total_params,
        max_active_params=args.max_active_params,
    )
    return coeffs, s


def register(sub) -> None:
    p = sub.add_parser(
        "plan", help="compute-optimal MoE (N, D, G) and a buildable architecture for a FLOPs budget"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--flops", type=positive_float, help="training budget in FLOPs, e.g. 1e20")
    what.add_argument(
        "--hours",
        type=positive_float,
        help="training budget in wall-clock hours on --devices devices (with --calibration)",
    )
    what.add_argument(
        "--paper-table", action="store_true", help="recompute the paper's Table 2 beside the printed values"
    )
    what.add_argument(
        "--joint-table",
        action="store_true",
        help="recompute the Joint MoE paper's Table 2 (optimal E per budget and memory) and Table 1 "
        "beside the printed values",
    )
    add_law_args(p)
    add_e_args(p)
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also draw loss vs FLOPs and iso-FLOP curves over G; with a fit's bootstrap draws, "
        "a fan chart of G*, N_act*, D* and the loss over budgets",
    )
    p.add_argument(
        "--write-config",
        metavar="FILE.yaml",
        help="write a training config for the planned architecture and its tokens (`finemoe train FILE`)",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE.json",
        help="plan for wall-clock time on a device measured by `finemoe bench calibrate`: the time-optimal "
        "G beside the FLOPs-optimal one",
    )
    add_memory_args(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def byte_size(text: str) -> float:
    """A number of bytes: 80e9, 80GB or 80G (powers of 1000), 80GiB (powers of 1024)."""
    t = text.strip().replace(" ", "")
    unit = t.lstrip("0123456789.eE+-")
    number = t[: len(t) - len(unit)] if unit else t
    scale = _BYTE_UNITS.get(unit.lower())
    try:
        v = float(number) * scale if scale is not None else None
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive size in bytes such as 80e9 or 80GB, got {text!r}"
        )
    return v


_BYTE_UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _BYTE_UNITS |= {_p: 1000.0**_i, f"{_p}b": 1000.0**_i, f"{_p}ib": 1024.0**_i}


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """Memory planning: the planned model's bytes per device and the smallest layout that fits."""
    g = p.add_argument_group("memory per device (docs/memory.md)")
    g.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        metavar="N",
        help="devices to train on: adds the memory plan",
    )
    g.add_argument(
        "--device-memory",
        type=byte_size,
        default=None,
        metavar="BYTES",
        help="memory of one device, e.g. 80e9, 80GB or 80GiB (with --devices)",
    )
    g.add_argument(
        "--micro-batch",
        type=positive_int,
        default=None,
        metavar="SEQS",
        help="sequences per forward per device (1)",
    )
    g.add_argument(
        "--seq-len",
        type=positive_int,
        default=None,
        help=f"tokens per sequence ({ModelConfig.seq_len}, what --write-config writes)",
    )
    g.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help=f"vocabulary size ({ModelConfig.vocab_size}, what --write-config writes)",
    )
    g.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="bf16 autocast (default, as on CUDA) or fp32"
    )


MEMORY_OPTIONS = ("device_memory", "micro_batch", "seq_len", "vocab_size", "precision")


def check_memory_args(args: argparse.Namespace) -> None:
    """The memory options go with --devices, and --devices with --device-memory; checked before any
    work."""
    from finemoe.errors import ConfigError

    extras = [f"--{k.replace('_', '-')}" for k in MEMORY_OPTIONS if getattr(args, k) is not None]
    if args.devices is None and extras:
        raise ConfigError(f"{', '.join(extras)} apply only with --devices N (the memory plan)")
    if args.devices is not None and args.device_memory is None and not args.calibration:
        raise ConfigError("--devices needs --device-memory BYTES, the memory of one device (e.g. 80e9)")
    if args.devices is not None and args.paper_table:
        raise ConfigError(
            "--devices sizes the memory of the plan for one --flops budget; it does not apply to "
            "--paper-table"
        )


def memory_layout(args: argparse.Namespace, arch) -> dict:
    """The `layout` object of the plan: the architecture's memory per device, the layout proposed."""
    from finemoe.scaling.memory import best_layout

    return best_layout(
        arch,
        args.devices,
        args.device_memory,
        micro_batch=args.micro_batch or 1,
        precision=args.precision or "bf16",
        seq_len=args.seq_len,
        vocab_size=args.vocab_size,
    )


def run(args: argparse.Namespace) -> int:
    from finemoe.scaling.budget import budget_plan
    from finemoe.train.config import write_planned_config

    if args.paper_table and args.write_config:
        from finemoe.errors import ConfigError

        raise ConfigError(
            "--write-config writes the plan for one --flops budget; it does not apply to --paper-table"
        )
    check_e_args(args)
    check_memory_args(args)
    if args.hours is not None and not args.calibration:
        from finemoe.errors import ConfigError

        raise ConfigError("--hours plans for wall-clock time: give --calibration FILE.json too")
    if args.calibration:
        emit(args, time_plan(args), _human_time_plan)
        return 0
    if args.joint_table:
        emit(args, joint_table(args), _human_joint_table)
        return 0
    if _law(args) == "joint":
        emit(args, joint_plan(args), _human_joint_plan)
        return 0
    check_outputs(args.plot, args.write_config)
    coeffs, s = load_law_args(args)
    coeffs, s, e_search = eq9_choose_e(args, coeffs, s)
    if args.paper_table:
        out = paper_table(coeffs, s)
        emit(args, out, _human_table)
    else:
        out, arch = budget_plan(coeffs, args.flops, s)
        if e_search is not None:
            out["expansion_rate"] = s.expansion_rate
            out["e_search"] = e_search
        if args.memory is not None:
            out["memory"] = _memory_cap_dict(args, s.max_total_params)
        if args.devices is not None:
            out["layout"] = memory_layout(args, arch)
        if args.write_config:
            out["config"] = write_planned_config(args.write_config, arch, s.expansion_rate)
        if args.json:
            warn_loudly(out)
        emit(args, out, _human_plan)
    if args.plot:
        from finemoe.report.plots import fan_figure, plan_figure
        from finemoe.scaling.trust import draws_of

        if not args.paper_table and draws_of(coeffs, "moe"):
            fan_figure(coeffs, s, args.flops, args.plot)
        else:
            marks = [r["flops"] for r in out["rows"]] if args.paper_table else [args.flops]
            plan_figure(coeffs, s, marks, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def warn_loudly(out: dict) -> None:
    """With --json, degenerate fits and far extrapolation also go to stderr, where a pipeline still shows
    them."""
    import sys

    ext = out.get("extrapolation") or {}
    lines = [f"WARNING: the {law} fit is degenerate: {'; '.join(f)}" for law, f in out["flags"].items() if f]
    if ext.get("loud"):
        lines.append(f"WARNING: {ext['warning']}")
    for line in lines:
        print(line, file=sys.stderr)


def paper_table(coeffs, s) -> dict:
    from finemoe.errors import ConfigError
    from finemoe.scaling import plan as P

    if abs(s.expansion_rate - 64) > 0 or s.c_f != 6 or s.c_r != 14 or s.aspect != 64 or s.capped:
        raise ConfigError(
            "--paper-table recomputes Table 2 (E=64, c_f=6, c_r=14, aspect 64, no size caps): use an E=64 "
            "coefficient set and leave --expansion-rate, --c-f, --c-r, --aspect and the --max-*-params unset"
        )
    rows = []
    for label, n_act, D, G, F, L in P.PAPER_TABLE2:
        p = P.optimum_for_active(coeffs.require("moe"), n_act, s)
        rows.append(
            {
                "row": label,
                "active_params": p.active_params,
                "total_params": p.total_params,
                "granularity": p.granularity,
                "tokens": p.tokens,
                "flops": p.flops,
                "loss": p.loss,
                "printed": {"granularity": G, "tokens": D, "flops": F, "loss": L},
                "tokens_rel_err": p.tokens / D - 1,
                "flops_rel_err": p.flops / F - 1,
                "loss_err": p.loss - L,
            }
        )
    return {"coefficients": coeffs.name, "expansion_rate": s.expansion_rate, "rows": rows}


def _g(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.2f}"


def _multiple(m: float | None, fmt: str) -> str:
    """How much compute a comparison model needs to reach the MoE's loss, in words."""
    if m is None or not math.isfinite(m):
        return "cannot reach the MoE's loss at any budget"
    if m < 1:
        return f"reaches the MoE's loss with {m:{fmt}}x the FLOPs: better than this MoE here"
    return f"needs {m:{fmt}}x the FLOPs to match"


def cap_terms(max_total: float | None, max_active: float | None) -> list[str]:
    """The size caps in force, as `N <= 20B` and `N_act <= 1B` (shared with `savings`)."""
    return [
        f"{what} <= {count(v, 4)}" for what, v in (("N", max_total), ("N_act", max_active)) if v is not None
    ]


def _caps_line(o: dict) -> str | None:
    st = o["settings"]
    caps = cap_terms(st["max_total_params"], st["max_active_params"])
    if not caps:
        return None
    binding = [name for name, p in (("MoE", o), ("G=1", o["g1"]), ("dense", o["dense"])) if p and p["at_cap"]]
    return f"  size caps            {', '.join(caps)} (binding for {', '.join(binding) or 'none'})"


def _human_plan(o: dict) -> str:
    a = o["architecture"]
    lines = _trust_lines(o) + [
        f"compute-optimal MoE for {o['budget']:.3g} FLOPs (coefficients: {o['coefficients']}, "
        f"E={o['settings']['expansion_rate']:g})",
        f"  granularity G        {_g(o['granularity'])}",
        f"  active params N_act  {count(o['active_params'], 4)}",
        f"  total params N       {count(o['total_params'], 4)}",
        f"  tokens D             {count(o['tokens'], 4)}",
        f"  predicted loss       {o['loss']:.4f}",
        "buildable architecture (same budget)",
        f"  d_model {a['d_model']}, n_blocks {a['n_blocks']}, n_heads {a['n_heads']}, "
        f"{a['n_experts']} experts x width {a['expert_width']} (G={a['granularity']})",
        f"  N_act {count(a['active_params'], 4)}, N {count(a['total_params'], 4)}, tokens "
        f"{count(a['tokens'], 4)}, "
        f"FLOPs {a['flops']:.4g}, loss {a['loss']:.4f}",
    ]
    caps = _caps_line(o)
    if caps:
        lines.insert(6, caps)
    g1 = o["g1"]
    lines.append(f"G=1 MoE at this budget: loss {g1['loss']:.4f}; {_multiple(g1['flops_multiple'], '.2f')}")
    if o["dense"] is not None:
        d = o["dense"]
        lines.append(
            f"dense at this budget: N {count(d['total_params'], 4)}, D {count(d['tokens'], 4)}, loss "
            f"{d['loss']:.4f}; "
            f"{_multiple(d['flops_multiple'], '.1f')}"
        )
    u = o.get("uncertainty")
    if u:
        lines.append(f"bootstrap band over {u['n_draws']} draws of the fit (p10 / p50 / p90)")
        for key, name in (
            ("granularity", "G*"),
            ("active_params", "N_act*"),
            ("tokens", "D*"),
            ("loss", "loss"),
            ("dense_flops_multiple", "dense x"),
        ):
            vals = [u[p].get(key) for p in ("p10", "p50", "p90")]
            if all(v is not None for v in vals):
                fmt = (
                    (lambda v: f"{v:.4f}")
                    if key == "loss"
                    else (lambda v: count(v, 3) if v >= 1000 else f"{v:.3g}")
                )
                lines.append(f"  {name:<8} {' / '.join(fmt(v) for v in vals)}")
    if o.get("memory"):
        m = o["memory"]
        lines.insert(
            6,
            f"  memory cap           {_gb(m['memory_bytes'])} GB at {m['bytes_per_param']:g} bytes per "
            f"param, {m['kv_tokens']:g} KV-cache tokens: N <= {count(m['max_total_params'], 4)}",
        )
    if o.get("e_search"):
        lines += _e_search_lines(o["e_search"], o["expansion_rate"])
    if o.get("layout"):
        lines += _memory_lines(o["layout"])
    if o.get("config"):
        lines.append(f"wrote {o['config']}: train it with `finemoe train {o['config']}`")
    return "\n".join(lines)


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _memory_lines(lay: dict) -> list[str]:
    """The memory table over the layouts tried and the proposal (or why nothing fits)."""
    n = lay["devices"]
    lines = [
        f"memory per device in GB: {n} device{'s' * (n > 1)} of {_gb(lay['device_memory'])} GB "
        f"({_gb(lay['usable_memory'])} usable), {lay['precision']}, micro-batch {lay['micro_batch']} x "
        f"{lay['seq_len']} tokens, vocabulary {lay['vocab_size']}",
        f"  {'layout':<16}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'buffers':>9}{'total':>9}",
    ]
    for t in lay["tried"]:
        m = t["bytes_per_device"]
        cells = "".join(f"{_gb(m[k]):>9}" for k in ("weights", "gradients", "optimizer", "activations"))
        mark = " <" if t["name"] == lay["name"] and lay["fits"] else ""
        lines.append(f"  {t['name']:<16}{cells}{_gb(m['buffers']):>9}{_gb(m['total']):>9}{mark}")
    notes = [f"  note: {n}" for n in lay["notes"]]
    if not lay["fits"]:
        return lines + [lay["reason"], *notes]
    mapping = ", ".join(f"{k}: {str(v).lower()}" for k, v in lay["parallel"].items())
    lines += [
        f"proposed layout (<): {lay['name']}, the first that fits in order of least communication",
        f"  training config: parallel: {{{mapping}}}, micro_batch_size: {lay['micro_batch']}",
        f"  launch: {lay['command']}",
        *notes,
    ]
    return lines


def _trust_lines(o: dict) -> list[str]:
    out = [
        f"DEGENERATE {law} FIT ({'; '.join(f)}): this plan is what the fit implies, not a prediction"
        for law, f in (o.get("flags") or {}).items()
        if f
    ]
    ext = o.get("extrapolation")
    if ext and ext.get("warning"):
        out.append(ext["warning"])
    return out


def _human_table(o: dict) -> str:
    head = f"Table 2 recomputed with coefficients {o['coefficients']} (ours / printed)"
    cols = f"{'N':<10} {'G':>9} {'D':>19} {'dD':>7} {'FLOPs':>19} {'dF':>7} {'loss':>13} {'dL':>7}"
    lines = [head, cols]
    for r in o["rows"]:
        pr = r["printed"]
        lines.append(
            f"{r['row']:<10} {_g(r['granularity']):>4}/{pr['granularity']:<4} "
            f"{count(r['tokens'], 4):>9}/{count(pr['tokens'], 4):<9} {r['tokens_rel_err']:+7.2%} "
            f"{r['flops']:9.3e}/{pr['flops']:<9.3g} {r['flops_rel_err']:+7.2%} "
            f"{r['loss']:.3f}/{pr['loss']:<7.3f} {r['loss_err']:+7.3f}"
        )
    return "\n".join(lines)


# --- choosing E: --search-e, --law joint, --memory, --joint-table (docs/choosing-e.md) --------------

DEFAULT_GRANULARITIES = "1,2,4,8,16,32,64,128,256"


def add_e_args(p: argparse.ArgumentParser) -> None:
    """Options for choosing E; plan-only, so `savings` keeps its options."""
    g = p.add_argument_group("choosing E under a memory cap (docs/choosing-e.md)")
    g.add_argument(
        "--law",
        choices=("eq9", "joint"),
        default=None,
        help="eq9: the fine-grained law, one coefficient set per E (default); joint: the Joint MoE law "
        "L(N_act, D, E) of arXiv 2502.05172, which searches E unless --expansion-rate fixes it",
    )
    g.add_argument(
        "--search-e",
        action="store_true",
        help="choose E too: eq9 among its sets fitted at E=16 and E=64, joint among 1,2,4,8,16,32",
    )
    g.add_argument(
        "--expansion-rates",
        metavar="LIST",
        default=None,
        help="the E searched, comma-separated, e.g. 4,8,16,32,64 (implies --search-e)",
    )
    g.add_argument(
        "--memory",
        type=byte_size,
        default=None,
        metavar="BYTES",
        help="cap on inference memory: weights with embeddings plus the KV cache, e.g. 80GB",
    )
    g.add_argument(
        "--kv-tokens",
        type=nonnegative_int,
        default=None,
        metavar="T",
        help="tokens held in the KV cache, counted in --memory (default 0)",
    )
    g.add_argument(
        "--bytes-per-param",
        type=positive_float,
        default=None,
        metavar="B",
        help="bytes per weight and per KV-cache entry in --memory (default 2, bfloat16)",
    )


def _law(args: argparse.Namespace) -> str:
    return args.law or ("joint" if args.joint_table else "eq9")


def _searching(args: argparse.Namespace) -> bool:
    return args.search_e or args.expansion_rates is not None


def _rates(args: argparse.Namespace) -> tuple[int, ...] | None:
    from finemoe.errors import ConfigError

    if args.expansion_rates is None:
        return None
    try:
        rates = sorted({int(x) for x in args.expansion_rates.split(",") if x.strip()})
    except ValueError:
        rates = []
    if not rates or rates[0] < 1:
        raise ConfigError(
            f"--expansion-rates must be comma-separated integers >= 1 such as 4,8,16, got "
            f"{args.expansion_rates!r}"
        )
    return tuple(rates)


def check_e_args(args: argparse.Namespace) -> None:
    """Options that do not go together, refused before any work."""
    from finemoe.errors import ConfigError

    law = _law(args)
    if args.joint_table:
        if args.law == "eq9":
            raise ConfigError("--joint-table recomputes the Joint MoE law's tables; drop --law eq9")
        given = _given(
            (
                ("--search-e", args.search_e),
                ("--expansion-rates", args.expansion_rates),
                ("--expansion-rate", args.expansion_rate),
                ("--memory", args.memory),
                ("--kv-tokens", args.kv_tokens),
                ("--bytes-per-param", args.bytes_per_param),
                ("--max-total-params", args.max_total_params),
                ("--max-active-params", args.max_active_params),
                ("--devices", args.devices),
                ("--write-config", args.write_config),
                ("--plot", args.plot),
            )
        )
        if given:
            raise ConfigError(
                "--joint-table recomputes the paper's tables at the paper's own settings; drop "
                + ", ".join(given)
            )
    if args.paper_table and (_searching(args) or args.memory is not None or law == "joint"):
        raise ConfigError(
            "--paper-table recomputes the fine-grained paper's Table 2 at E=64 without caps; it does not "
            "apply with --search-e, --expansion-rates, --memory or --law joint"
        )
    if args.memory is None and (args.kv_tokens is not None or args.bytes_per_param is not None):
        raise ConfigError("--kv-tokens and --bytes-per-param describe the --memory cap; give --memory BYTES")
    if _searching(args) and args.expansion_rate is not None:
        raise ConfigError("--expansion-rate fixes E and --search-e searches it; give one of them")
    _rates(args)
    if law == "joint":
        bad = _given(
            (
                ("--write-config", args.write_config),
                ("--devices", args.devices),
                ("--plot", args.plot),
                ("--continuous-g", args.continuous_g),
                ("--granularities", args.granularities != DEFAULT_GRANULARITIES),
                ("--c-f", args.c_f != 6.0),
                ("--c-r", args.c_r != 14.0),
                ("--aspect", args.aspect != 64.0),
            )
        )
        if bad:
            raise ConfigError(
                f"--law joint is the paper's own model family (Switch top-1 experts of G=1, F = 6 N_act D, "
                f"n_blocks = d_model/64); {', '.join(bad)} do not apply to it"
            )


def _given(flags) -> list[str]:
    """The flags of (flag, value) pairs whose value is set (a refusal lists them)."""
    return [flag for flag, v in flags if v]


def _caps(args: argparse.Namespace, total_params: bool = True):
    from finemoe.scaling import joint as J

    return J.Caps(
        memory=args.memory,
        kv_tokens=float(args.kv_tokens or 0),
        bytes_per_param=args.bytes_per_param or J.BF16,
        max_total_params=args.max_total_params if total_params else None,
        max_active_params=args.max_active_params if total_params else None,
    )


def _memory_cap_dict(args: argparse.Namespace, max_total_params: float | None) -> dict:
    from finemoe.scaling import joint as J

    return {
        "memory_bytes": args.memory,
        "kv_tokens": float(args.kv_tokens or 0),
        "bytes_per_param": args.bytes_per_param or J.BF16,
        "vocab": J.VOCAB,
        "max_total_params": max_total_params,
    }


def eq9_choose_e(args: argparse.Namespace, coeffs, s):
    """Under Eq. 9: apply --memory and, with --search-e, pick E (finemoe.scaling.eq9_e_search)."""
    from finemoe.scaling import eq9_e_search

    caps = _caps(args)
    if not _searching(args):
        return coeffs, eq9_e_search.capped(s, caps), None
    return eq9_e_search.search(coeffs, s, args.flops, caps, _rates(args))


def _e_search_lines(rows: list[dict], chosen: float) -> list[str]:
    lines = [f"E searched ({'per-E coefficient set' if 'coefficients' in rows[0] else 'joint law'})"]
    for r in rows:
        mark = " <" if r["expansion_rate"] == chosen else ""
        name = f" {r['coefficients']:<11}" if "coefficients" in r else ""
        if not r["feasible"]:
            lines.append(f"  E={r['expansion_rate']:<4g}{name} no model fits: {r['reason']}")
            continue
        cap = " (at cap)" if r["at_cap"] else ""
        lines.append(
            f"  E={r['expansion_rate']:<4g}{name} N_act {count(r['active_params'], 3):>7}, "
            f"N {count(r['total_params'], 3):>7}, D {count(r['tokens'], 3):>7}, "
            f"{_gb(r['memory_bytes'])} GB, loss {r['loss']:.4f}{cap}{mark}"
        )
    return lines


def _joint_plan_dict(p) -> dict:
    return {
        "expansion_rate": p.expansion_rate,
        "active_params": p.active_params,
        "total_params": p.total_params,
        "total_params_nonembedding": p.total_params_nonembedding,
        "tokens": p.tokens,
        "loss": p.loss,
        "d_model": p.d_model,
        "n_blocks": p.n_blocks,
        "memory_bytes": p.memory_bytes,
        "at_cap": p.at_cap,
        "compute_optimal_active_params": p.compute_optimal_active_params,
    }


def _load_joint(args: argparse.Namespace):
    from finemoe.scaling import joint as J

    return J.load_joint("joint" if args.coefficients in ("paper", "joint") else args.coefficients)


def joint_plan(args: argparse.Namespace) -> dict:
    """The Joint MoE law's plan for one budget: E (searched unless fixed), N_act and D within the caps."""
    from finemoe.scaling import joint as J

    jset = _load_joint(args)
    caps = _caps(args)
    if args.expansion_rate is not None:
        best, rows = J.optimum(jset.law, args.flops, args.expansion_rate, caps), None
    else:
        best, rows = J.search_e(jset.law, args.flops, _rates(args) or J.PAPER_RATES, caps)
    out = {
        "law": "joint",
        "coefficients": jset.name,
        "budget": args.flops,
        **_joint_plan_dict(best),
        "caps": {
            "memory_bytes": caps.memory,
            "kv_tokens": caps.kv_tokens,
            "bytes_per_param": caps.bytes_per_param,
            "max_total_params": caps.max_total_params,
            "max_active_params": caps.max_active_params,
        },
        "beyond_fit": J.beyond_fit(best, jset.fitted_range),
    }
    if rows is not None:
        out["e_search"] = [
            {"expansion_rate": r.expansion_rate, "feasible": r.plan is not None}
            | (_joint_plan_dict(r.plan) if r.plan is not None else {"reason": r.reason})
            for r in rows
        ]
    return out


def _human_joint_plan(o: dict) -> str:
    c = o["caps"]
    caps = cap_terms(c["max_total_params"], c["max_active_params"])
    if c["memory_bytes"] is not None:
        caps.insert(
            0,
            f"memory <= {_gb(c['memory_bytes'])} GB ({c['bytes_per_param']:g} B/param, "
            f"{c['kv_tokens']:g} KV tokens)",
        )
    lines = [
        f"Joint MoE law for {o['budget']:.3g} FLOPs (coefficients: {o['coefficients']}, arXiv 2502.05172; "
        "counts include embeddings, F = 6 N_act D)",
        f"  expansion rate E     {o['expansion_rate']:g}",
        f"  active params N_act  {count(o['active_params'], 4)}",
        f"  total params N       {count(o['total_params'], 4)} "
        f"({count(o['total_params_nonembedding'], 4)} without embeddings)",
        f"  tokens D             {count(o['tokens'], 4)}",
        f"  memory               {_gb(o['memory_bytes'])} GB",
        f"  predicted loss       {o['loss']:.4f}",
        f"  caps                 {', '.join(caps) or 'none'}" + (" (binding)" if o["at_cap"] else ""),
    ]
    lines += [f"  beyond the fitted runs: {w}" for w in o["beyond_fit"]]
    if o.get("e_search"):
        lines += _e_search_lines(o["e_search"], o["expansion_rate"])
    return "\n".join(lines)


def joint_table(args: argparse.Namespace) -> dict:
    """The Joint MoE paper's Table 2 (optimal E per budget and memory) and Table 1, ours beside theirs."""
    from finemoe.scaling import joint as J

    jset = _load_joint(args)
    t2 = J.table2(jset.law)
    return {
        "coefficients": jset.name,
        "source": jset.source,
        "memory_model": {
            "memory_bytes": list(J.TABLE2_MEMORY),
            "kv_tokens": J.TABLE2_KV_TOKENS,
            "bytes_per_param": J.BF16,
            "vocab": J.VOCAB,
            "expansion_rates": list(J.PAPER_RATES),
        },
        "table2": t2,
        "table2_matches": sum(r["match"] for r in t2),
        "table1": J.table1(jset.law),
    }


def _e_cell(E: float, at_least: bool) -> str:
    return f"{'≥' if at_least else ''}{E:g}"


def _human_joint_table(o: dict) -> str:
    mm = o["memory_model"]
    mems = mm["memory_bytes"]
    lines = [
        f"Joint MoE paper, Table 2 recomputed with coefficients {o['coefficients']}: optimal E, ours / "
        f"printed ({mm['kv_tokens']} KV-cache tokens, {mm['bytes_per_param']:g} bytes per param, E in "
        f"{','.join(f'{e:g}' for e in mm['expansion_rates'])})",
        f"{'FLOPs':<8}" + "".join(f"{f'{m / 1e9:g} GB':>14}" for m in mems),
    ]
    t2 = o["table2"]
    for i in range(0, len(t2), len(mems)):
        row = t2[i : i + len(mems)]
        cells = [
            f"{_e_cell(r['expansion_rate'], r['at_least'])}/{_e_cell(r['printed'], r['printed_at_least'])}"
            + ("" if r["match"] else " *")
            for r in row
        ]
        lines.append(f"{row[0]['flops']:<8.0e}" + "".join(f"{c:>14}" for c in cells))
    lines.append(f"{o['table2_matches']} of {len(t2)} cells agree; where they differ (*), this law rates")
    lines += [
        f"  {r['flops']:.0e} FLOPs, {r['memory_bytes'] / 1e9:g} GB: the printed E={r['printed']:g} "
        f"{r['margin']:.4f} above E={r['expansion_rate']:g} in loss"
        for r in t2
        if not r["match"]
    ]
    lines.append("Table 1 recomputed (Eq. 7): compute-optimal N_act and D, ours / printed")
    for r in o["table1"]:
        pr = r["printed"]
        lines.append(
            f"  {r['flops']:.0e} E={r['expansion_rate']:<3g} N_act {count(r['active_params'], 3):>6}/"
            f"{count(pr['active_params'], 3):<6} {r['active_params_rel_err']:+6.1%}   D "
            f"{count(r['tokens'], 3):>6}/{count(pr['tokens'], 3):<6} {r['tokens_rel_err']:+6.1%}"
        )
    return "\n".join(lines)


def time_plan(args: argparse.Namespace) -> dict:
    """`--calibration`: the time-optimal plan beside the FLOPs-optimal one (finemoe.scaling.time_plan)."""
    from finemoe.errors import ConfigError
    from finemoe.scaling import time_plan as T
    from finemoe.scaling.cost_model import load_calibration

    if args.paper_table or args.joint_table or _law(args) == "joint" or args.device_memory is not None:
        raise ConfigError(
            "--calibration plans one --flops or --hours budget under Eq. 9; drop the other modes"
        )
    ignored = _given(
        (
            ("--write-config", args.write_config),
            ("--plot", args.plot),
            ("--memory", getattr(args, "memory", None)),
            ("--micro-batch", getattr(args, "micro_batch", None)),
            ("--search-e", getattr(args, "search_e", False)),
        )
    )
    if ignored:
        raise ConfigError(f"{', '.join(ignored)}: not with --calibration (a wall-clock plan); drop them")
    cal = load_calibration(args.calibration)
    coeffs, s = load_law_args(args)
    if args.flops is not None:
        from finemoe.scaling.plan import check_plannable

        check_plannable(args.flops, s)
    devices = args.devices or 1
    seconds = args.hours * 3600 * devices if args.hours is not None else None
    out = T.compare(coeffs.require("moe"), cal["coefficients"], s, flops=args.flops, seconds=seconds)
    out["calibration"] = T.calibration_summary(cal, args.calibration, out["time_optimal"]["d_model"])
    out["devices"], out["hours"] = devices, out["seconds"] / 3600 / devices
    return out


def _human_time_plan(o: dict) -> str:
    t, f, c = o["time_optimal"], o["flops_optimal"], o["calibration"]
    ts = o["time_saving"]
    lines = [
        f"wall-clock budget {o['hours']:.4g} h on {o['devices']} device(s) ({c['device']}, {c['file']})",
        f"time-optimal   G={t['granularity']:g}  N_act {count(t['active_params'])}  D {count(t['tokens'])}  "
        f"loss {t['loss']:.4f}",
        f"FLOPs-optimal  G={f['granularity']:g}  N_act {count(f['active_params'])}  D {count(f['tokens'])}  "
        f"loss {f['loss']:.4f}",
        f"time saving {ts:.3g}x: the time-optimal plan reaches the FLOPs-optimal loss in {1 / ts:.0%} of "
        "its time"
        if ts
        else "time saving: n/a (the time-optimal plan does not reach the FLOPs-optimal loss in range)",
        f"why: {o['why']}",
    ]
    if c["width_extrapolation"] and c["width_extrapolation"] > 2:
        lines.append(
            f"note: d_model {t['d_model']:.0f} is {c['width_extrapolation']:.0f}x the widest block "
            f"calibrated ({c['largest_width_measured']}); the cost model extrapolates"
        )
    if c["holdout_error"] is not None:
        lines.append(f"calibration held-out error: {c['holdout_error']:.1%}")
    return "\n".join(lines)
