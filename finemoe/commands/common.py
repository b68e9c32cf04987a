"""Helpers shared by the CLI commands: JSON vs human output, argument types with clear errors."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable

from finemoe.io import finite_or_none


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(args: argparse.Namespace, obj: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    """Print `obj` as one JSON object under --json, else the human rendering."""
    if getattr(args, "json", False):
        json.dump(strict_json(obj), sys.stdout, sort_keys=False, allow_nan=False)
        sys.stdout.write("\n")
    else:
        print(human(obj))


def strict_json(x: Any) -> Any:
    """Plain JSON values: numpy/torch scalars and arrays unwrapped, and NaN or infinity (an
    unreachable target, a missing loss) as null, which every JSON parser reads (bare NaN/Infinity
    are not JSON)."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, (str, bool, int)) or x is None:
        return x
    if isinstance(x, float):
        return finite_or_none(x)
    if hasattr(x, "tolist"):  # numpy / torch arrays and scalars
        return strict_json(x.tolist())
    if hasattr(x, "item"):
        return strict_json(x.item())
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _int_at_least(text: str, lo: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 1e20, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return v


def nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def check_outputs(*paths: str | None) -> None:
    """Output files named on the command line can be written (not a folder, folder creatable): checked
    before any work, so a bad path never costs a computation."""
    from finemoe.io import check_writable_file

    for p in paths:
        if p:
            check_writable_file(p)
