"""`finemoe savings`: how much compute a compute-optimal fine-grained MoE saves over dense and G=1 MoE."""

from __future__ import annotations

import argparse
import math

from finemoe.commands.common import add_json_flag, check_outputs, emit, positive_float
from finemoe.commands.plan import add_law_args, cap_terms, load_law_args

DEFAULT_BUDGETS = tuple(10.0**e for e in range(18, 27))

# The paper's headline numbers (§1, Fig. 1b) and what its printed coefficients give; see docs.
CLAIM_NOTE = (
    "paper: ~20x dense at 1e20 and >40x beyond 1e25 (Fig. 1b). Table 1's 3-digit coefficients give ~21x "
    "at 1e20 but only ~32x at 1e25: the multiple is very sensitive to the dense exponents (lowering dense "
    "alpha and beta by 0.0005 each gives ~40x), so the >40x figure is not reproducible from the printed "
    "values."
)


def register(sub) -> None:
    p = sub.add_parser(
        "savings", help="FLOPs multiple a dense model and a G=1 MoE need to match the optimal MoE"
    )
    p.add_argument(
        "--flops",
        type=positive_float,
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        metavar="F",
        help="budgets in FLOPs (default 1e18 .. 1e26)",
    )
    add_law_args(p)
    p.add_argument("--plot", metavar="OUT.png", help="also draw loss vs FLOPs and the compute multiples")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finemoe.scaling.plan import compare

    check_outputs(args.plot)
    coeffs, s = load_law_args(args)
    coeffs.require("dense")
    rows = []
    for F in args.flops:
        c = compare(coeffs, F, s)
        rows.append(
            {
                "flops": F,
                "granularity": c.moe.granularity,
                "loss": c.moe.loss,
                "dense_loss": c.dense.loss,
                "dense_flops_multiple": c.dense_flops_multiple,
                "g1_loss": c.g1.loss,
                "g1_flops_multiple": c.g1_flops_multiple,
            }
        )
    out = {
        "coefficients": coeffs.name,
        "expansion_rate": s.expansion_rate,
        "max_total_params": s.max_total_params,
        "max_active_params": s.max_active_params,
        "rows": rows,
    }
    if coeffs.name.startswith("paper") and not s.capped:
        out["note"] = CLAIM_NOTE
    emit(args, out, _human)
    if args.plot:
        from finemoe.report.plots import savings_figure

        savings_figure(coeffs, s, args.flops, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def _x(m: float, width: int, fmt: str) -> str:
    return f"{m:{width}{fmt}}x" if math.isfinite(m) else f"{'never':>{width + 1}}"


def _human(o: dict) -> str:
    caps = cap_terms(o["max_total_params"], o["max_active_params"])
    cap_text = f", size caps {', '.join(caps)} for every model" if caps else ""
    lines = [
        f"compute savings of the optimal MoE (coefficients: {o['coefficients']}, "
        f"E={o['expansion_rate']:g}{cap_text})",
        f"{'FLOPs':>9} {'G_opt':>6} {'MoE loss':>9} {'dense loss':>11} {'dense x':>8} {'G=1 x':>7}",
    ]
    for r in o["rows"]:
        g = r["granularity"]
        lines.append(
            f"{r['flops']:9.2g} {g:6g} {r['loss']:9.4f} {r['dense_loss']:11.4f} "
            f"{_x(r['dense_flops_multiple'], 7, '.1f')} {_x(r['g1_flops_multiple'], 6, '.2f')}"
        )
    lines.append(
        "dense x / G=1 x: FLOPs a compute-optimal dense / G=1 MoE model needs to reach the MoE's loss, as a "
        "multiple" + ("; never: not at any budget under the caps" if caps else "")
    )
    if "note" in o:
        lines.append("note: " + o["note"])
    return "\n".join(lines)
