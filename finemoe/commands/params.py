"""`finemoe params`: the paper's parameter and FLOPs counts for one architecture."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, emit, positive_int


def register(sub) -> None:
    p = sub.add_parser("params", help="parameter and FLOPs counts (paper definitions) for an architecture")
    p.add_argument("--d-model", type=positive_int, required=True, help="model width d_model")
    p.add_argument("--n-blocks", type=positive_int, required=True, help="Transformer blocks n")
    p.add_argument(
        "--expansion-rate", "-E", type=positive_int, default=64, help="E (default 64, the paper's)"
    )
    p.add_argument("--granularity", "-G", type=positive_int, default=1, help="G (default 1)")
    p.add_argument("--dense", action="store_true", help="a dense Transformer instead of an MoE")
    p.add_argument("--vocab-size", type=positive_int, default=8192, help="for the exact count only")
    p.add_argument("--seq-len", type=positive_int, default=256, help="for the exact count only")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finemoe.accounting import exact_flops_per_token, exact_params, paper_counts
    from finemoe.config import ModelConfig

    cfg = ModelConfig(
        d_model=args.d_model,
        n_blocks=args.n_blocks,
        ffn="dense" if args.dense else "moe",
        expansion_rate=args.expansion_rate,
        granularity=args.granularity,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
    )
    out = paper_counts(cfg)
    out["exact_params"] = exact_params(cfg)
    out["exact_flops_per_token"] = exact_flops_per_token(cfg)
    emit(args, out, _human)
    return 0


def _human(o: dict) -> str:
    rows = [
        ("active params (N_act)", f"{o['active_params']:,}"),
        ("total params (N)", f"{o['total_params']:,}"),
        ("router params", f"{o['router_params']:,}"),
        ("training FLOPs / token", f"{o['flops_per_token']:.4g}"),
        ("experts x width", f"{o['n_experts']} x {o['expert_width']}"),
        ("exact params (all)", f"{o['exact_params']['total']:,}"),
        ("exact FLOPs / token (all)", f"{o['exact_flops_per_token']['total']:.4g}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
