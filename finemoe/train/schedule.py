"""LR schedules as multipliers of the peak LR (pure math, no torch; use with torch's LambdaLR).

`WarmupCosine` is the paper's: as in its code (`lizrd/train/scheduler.py`), during warmup
lr = peak * (step + 1) / W, then lr = final + 0.5 * (peak - final) * (1 + cos(pi * (step - W) / (T - W))),
with the cosine ending at the last step T of the run (Chinchilla-style: the token budget sets the cycle).

`WarmupStableDecay` (WSD, Hägele et al. 2024) holds the peak after warmup and decays only over the last
`cooldown_steps`. Up to the decay the multiplier does not depend on the run's length, so one long stable
run can be branched into shorter runs: a branch started from the long run's state at its own decay start
computes exactly what a dedicated run of that length would.
"""

from __future__ import annotations

import math

COOLDOWN_SHAPES = ("linear", "1-sqrt")


class WarmupCosine:
    """LR multiplier for step s; picklable, so it survives checkpoints."""

    def __init__(self, total_steps: int, warmup_steps: int, final_fraction: float = 0.1):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step: int) -> float:
        T, W, f = self.total_steps, self.warmup_steps, self.final_fraction
        if step < W:
            return (step + 1) / W
        if T <= W:
            return f
        progress = min(1.0, (step - W) / (T - W))
        return f + 0.5 * (1.0 - f) * (1.0 + math.cos(math.pi * progress))


class WarmupStableDecay:
    """Linear warmup, the peak, then a linear or 1-sqrt decay that reaches `final_fraction` at the last
    step."""

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int,
        cooldown_steps: int,
        final_fraction: float = 0.0,
        shape: str = "1-sqrt",
    ):
        if shape not in COOLDOWN_SHAPES:
            raise ValueError(f"cooldown shape must be one of {COOLDOWN_SHAPES}, got {shape!r}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.cooldown_steps = int(cooldown_steps)
        self.final_fraction = float(final_fraction)
        self.shape = shape

    @property
    def decay_start(self) -> int:
        """The first step whose LR is below the peak: a branch of this length starts from here."""
        return self.total_steps - self.cooldown_steps

    def __call__(self, step: int) -> float:
        W, f = self.warmup_steps, self.final_fraction
        if step < W:
            return (step + 1) / W
        if step < self.decay_start:
            return 1.0
        progress = min(1.0, (step - self.decay_start + 1) / self.cooldown_steps)
        drop = progress if self.shape == "linear" else math.sqrt(progress)
        return f + (1.0 - f) * (1.0 - drop)


def lr_at(step: int, peak: float, total_steps: int, warmup_steps: int, final_fraction: float = 0.1) -> float:
    return peak * WarmupCosine(total_steps, warmup_steps, final_fraction)(step)
