"""Per-step metrics: the JSONL log, the smoothed loss and the expert-load imbalance."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any

from finemoe.io import finite_or_none, write_text_atomic

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log, skipping a line a kill cut short (and anything not a record)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsLog:
    """Append-only JSONL, one object per line, flushed each write so a kill loses at most one line."""

    def __init__(self, path: str | Path, resume_step: int | None):
        self.path = Path(path)
        if resume_step is None:
            write_text_atomic(self.path, "")
        else:
            self._truncate_after(resume_step)
        self._f = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run wrote after its last checkpoint; the resumed run rewrites them."""
        if not self.path.is_file():
            write_text_atomic(self.path, "")
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if rec.get("step", math.inf) <= step:
                keep.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def write(self, rec: dict[str, Any]) -> None:
        clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in rec.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class Smoother:
    """Mean of the last `window` step losses: the paper fits this, not the last noisy step."""

    def __init__(self, window: int, history: list[float] | None = None):
        self.losses: deque[float] = deque(history or [], maxlen=window)

    def add(self, loss: float) -> float:
        self.losses.append(loss)
        return self.value

    @property
    def value(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


def imbalance(load) -> float | None:
    """Max expert load / mean expert load in the worst MoE layer (1.0 = perfectly balanced).

    `load` is [n_layers, n_experts] of routed-slot fractions (the FFN contract in finemoe.nn.model).
    """
    if load is None:
        return None
    load = load.float().reshape(-1, load.shape[-1])
    ratio = load.max(dim=-1).values / load.mean(dim=-1).clamp_min(1e-12)
    return float(ratio.max())
