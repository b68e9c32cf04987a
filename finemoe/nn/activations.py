"""The activation table every layer reads: a leaf module, so the model and the experts share it without
importing each other."""

from __future__ import annotations

import torch.nn.functional as F

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
