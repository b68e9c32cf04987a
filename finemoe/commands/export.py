"""`finemoe export RUN_OR_MODEL_DIR --hf OUT/`: a trained model as a Hugging Face transformers folder."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, emit


def register(sub) -> None:
    p = sub.add_parser("export", help="write a trained model as a Hugging Face transformers model folder")
    p.add_argument("source", metavar="RUN_OR_MODEL_DIR", help="a finished run folder or its model/ folder")
    p.add_argument(
        "--hf", required=True, metavar="OUT", help="the transformers folder to write (new or empty)"
    )
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import transformers  # noqa: F401
    except ImportError:
        from finemoe.errors import ConfigError

        raise ConfigError("export needs transformers: pip install 'finemoe[export]'") from None
    from finemoe.export.hf import export_hf

    out = export_hf(args.source, args.hf)
    emit(args, out, _human)
    return 0


def _human(o: dict) -> str:
    how = (
        "AutoModelForCausalLM.from_pretrained(path)"
        if o["format"] == "gpt2"
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    )
    return f"wrote {o['out']} ({o['format']}: {', '.join(o['files'])}); load it with {how}"
