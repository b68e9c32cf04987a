"""Human-readable counts (parameters, tokens, FLOPs) shared by the CLI tables and the report."""

from __future__ import annotations

import math
from typing import Any

_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


def count(x: Any, digits: int = 3) -> str:
    """1.08B, 135M, 512; beyond a thousand trillion plain scientific notation (1.02e+20), where a
    suffixed mantissa would grow without bound. None or a non-finite value reads as a dash."""
    if x is None or not math.isfinite(float(x)):
        return "–"
    x = float(f"{float(x):.{digits}g}")  # rounded first, so 999.97K reads 1M, not 1e+03K
    if abs(x) >= 1e15:
        return f"{x:.{digits}g}"
    for div, suffix in _SUFFIXES:
        if abs(x) >= div:
            return f"{x / div:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"
