"""`finemoe generate CHECKPOINT --prompt TEXT`: sample text from a trained model."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, emit, nonnegative_int, positive_int


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a trained model (a run folder, its model/ folder, or its ckpt.pt)"
    )
    p.add_argument(
        "checkpoint",
        metavar="RUN_OR_MODEL",
        help="a run folder (out_dir of `finemoe train`), its model/ folder, or its ckpt.pt",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to sample (default 100)")
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument(
        "--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default 50)"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's copy, else its data_dir's)")
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)"
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from finemoe.api import load
    from finemoe.errors import ConfigError
    from finemoe.train.generate import find_tokenizer, sample, training_config

    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("--prompt holds bytes that are not UTF-8 text; pass the prompt as UTF-8") from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available; use --device cpu")
    model = load(args.checkpoint, args.device)
    tok_path = find_tokenizer(args.checkpoint, training_config(args.checkpoint), args.tokenizer)
    try:
        tok = Tokenizer.from_file(str(tok_path))
    except Exception as e:
        raise ConfigError(f"cannot load tokenizer {tok_path}: {e}") from None
    ids = tok.encode(args.prompt).ids
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise ConfigError(
            f"{tok_path} has {tok.get_vocab_size()} tokens but the model only {model.cfg.vocab_size}; pass "
            "the run's tokenizer"
        )
    out = sample(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    text = tok.decode(out)
    emit(
        args,
        {"prompt": args.prompt, "text": text, "completion": tok.decode(out[len(ids) :]), "tokens": out},
        lambda o: o["text"],
    )
    return 0
