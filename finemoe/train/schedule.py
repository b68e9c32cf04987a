"""The paper's LR schedule: linear warmup over 1% of steps, then one cosine cycle to 10% of peak.

As in the paper's code (`lizrd/train/scheduler.py`): during warmup lr = peak * (step + 1) / W, then
lr = final + 0.5 * (peak - final) * (1 + cos(pi * (step - W) / (T - W))), with the cosine ending at the
last step T of the run (Chinchilla-style: the token budget sets the cycle). Pure math, no torch.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """LR multiplier for step s (use with torch's LambdaLR); picklable, so it survives checkpoints."""

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


def lr_at(step: int, peak: float, total_steps: int, warmup_steps: int, final_fraction: float = 0.1) -> float:
    return peak * WarmupCosine(total_steps, warmup_steps, final_fraction)(step)
