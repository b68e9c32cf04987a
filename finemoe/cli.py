"""`finemoe` command line: parse arguments and dispatch; each command lives in finemoe/commands/."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finemoe.errors import FinemoeError
from finemoe.io import os_error_text

# Each module defines register(subparsers) and keeps heavy imports (torch, scipy) inside its handler,
# so `finemoe plan` never pays for torch.
COMMANDS = (
    "params",
    "plan",
    "savings",
    "fit",
    "data",
    "train",
    "generate",
    "export",
    "bench",
    "sweep",
    "report",
    "plot-run",
    "quickstart",
)


DESCRIPTION = (
    "Fine-grained Mixture-of-Experts language models and their scaling laws: plan the MoE for your "
    "compute budget, train it, sweep sizes and granularities, and fit the laws to your own runs."
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finemoe")
    except PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (problem + where to look), exit code 2, from the
    (sub)command it concerns: each parser records itself, and the deepest one used wins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finemoe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"finemoe {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"finemoe.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):  # KEY=VALUE given after a flag
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if "=" not in x or x.startswith("-")]
    if extra:  # as parse_args would, but naming the subcommand whose options these are not
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except FinemoeError as e:
        print(f"finemoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"finemoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `finemoe ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the disk filled, a file vanished mid-run, ...: the system's reason, one line
        print(f"finemoe {args.command}: error: {os_error_text(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
