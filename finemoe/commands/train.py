"""`finemoe train CONFIG.yaml [--resume] [key=value ...]`: train one model to its token budget."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, emit


def register(sub) -> None:
    p = sub.add_parser("train", help="train one model on a token file to its token budget D")
    p.add_argument("config", help="training config YAML (see configs/tiny.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. tokens=2e6 model.granularity=4 out_dir=runs/g4",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in out_dir from its last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from finemoe.train.config import TrainConfig

    cfg = TrainConfig.from_yaml(args.config, args.overrides)  # a bad config fails before torch loads
    from finemoe.train.trainer import train

    record = train(cfg, resume=args.resume, quiet=args.quiet or args.json)
    record = {k: v for k, v in record.items() if k != "config"}
    if is_main_process():  # under torchrun every rank returns the record; one summary is enough
        emit(args, record, _human)
    return 0 if record["status"] in ("done", "stopped") else 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (its RANK variable), or a plain process."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _human(r: dict) -> str:
    if r["status"] == "stopped":
        return f"stopped at step {r['steps']} with a checkpoint in {r['out_dir']}; --resume goes on"

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"status        {r['status']}",
        f"train loss    {f(r['train_loss'], '.4f')} (mean of last {r['train_loss_window']} steps)",
        f"val loss      {f(r['val_loss'], '.4f')}",
        f"N / N_act     {r['total_params']:,} / {r['active_params']:,}",
        f"tokens (D)    {r['tokens']:,} in {r['steps']} steps",
        f"FLOPs (F)     {r['flops']:.4g}",
        f"throughput    {f(r['tokens_per_s'], ',.0f')} tokens/s on {r['device']}",
        f"wall time     {r['wall_time_s']:.1f} s",
        f"outputs in    {r['out_dir']}",
    ]
    return "\n".join(lines)
