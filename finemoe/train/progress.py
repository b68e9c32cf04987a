"""Training progress: a tqdm bar on a terminal, plain lines with an ETA elsewhere (a Slurm log, a pipe).

A bar redrawn with carriage returns is unreadable in a file, and nothing at all leaves a long job's
log silent; so off a terminal the trainer prints one line every `every` steps.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def duration(seconds: float) -> str:
    """3h05m, 12m40s or 45s."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class LineProgress:
    """One line per `every` steps: step, smoothed loss, tokens/s and the time left at the mean pace so far."""

    def __init__(self, total: int, start: int, every: int, name: str, stream: TextIO | None = None):
        self.total, self.start, self.every, self.name = total, start, max(1, every), name
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def step(self, done: int, rec: dict[str, Any]) -> None:
        if done % self.every and done != self.total:
            return
        pace = (time.perf_counter() - self.t0) / max(1, done - self.start)
        print(
            f"{self.name}: step {done}/{self.total}  loss {rec['loss_smooth']:.4f}  "
            f"{rec['tokens_per_s']:,.0f} tokens/s  ETA {duration(pace * (self.total - done))}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        pass


class BarProgress:
    """tqdm's bar, for a terminal."""

    def __init__(self, total: int, start: int, name: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc=name)

    def step(self, done: int, rec: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{rec['loss_smooth']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False
        )

    def close(self) -> None:
        self.bar.close()
