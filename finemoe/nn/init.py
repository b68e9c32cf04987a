"""The paper's initialisation: truncated normal, std = sqrt(scale / fan_in), cut at +-2*scale absolute."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def trunc_normal_(w: torch.Tensor, fan_in: float, scale: float = 0.1) -> torch.Tensor:
    std = math.sqrt(scale / fan_in)
    return torch.nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * scale, b=2 * scale)
