"""`finemoe generate RUN_OR_MODEL --prompt TEXT [--prompt TEXT ...]`: continue prompts with a model."""

from __future__ import annotations

import argparse
import math

from finemoe.commands.common import add_json_flag, emit, nonnegative_float, nonnegative_int, positive_int


def _top_p(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="continue prompts with a trained model (a run folder, its model/ folder, or its ckpt.pt)",
    )
    p.add_argument(
        "checkpoint",
        metavar="RUN_OR_MODEL",
        help="a run folder (out_dir of `finemoe train`), its model/ folder, or its ckpt.pt",
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="text to continue; repeat for several prompts, decoded together as one batch",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to sample (default 100)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument(
        "--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default 50)"
    )
    p.add_argument(
        "--top-p",
        type=_top_p,
        default=None,
        help="sample among the fewest likeliest tokens holding this probability, in (0, 1] (default: all)",
    )
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="sampling seed; prompt i uses SEED+i (default 0)"
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep going past <|endoftext|> (default: a prompt stops there when the tokenizer has it)",
    )
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's copy, else its data_dir's)")
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)"
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def _check_prompts(prompts: list[str]) -> None:
    """Prompts are checked before the model loads, so a typo costs nothing."""
    from finemoe.errors import ConfigError

    for text in prompts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                "--prompt holds bytes that are not UTF-8 text; pass the prompt as UTF-8"
            ) from None
        if not text:
            raise ConfigError("--prompt is empty; give text to continue")


def run(args: argparse.Namespace) -> int:
    from finemoe.api import load
    from finemoe.errors import ConfigError
    from finemoe.train.generate import find_tokenizer, generate_text, load_tokenizer, training_config

    _check_prompts(args.prompt)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    model = load(args.checkpoint, args.device)
    tok = load_tokenizer(find_tokenizer(args.checkpoint, training_config(args.checkpoint), args.tokenizer))
    results = generate_text(
        model,
        tok,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        stop_at_eos=not args.ignore_eos,
    )
    emit(args, {"results": results}, lambda o: "\n\n".join(r["text"] for r in o["results"]))
    return 0
