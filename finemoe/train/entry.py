"""`finemoe.train(config)`: train a YAML config or a dict of TrainConfig fields, with overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train(config: str | Path | dict, resume: bool = False, quiet: bool = True, **overrides: Any) -> dict:
    """Train a config (a YAML path or a dict of TrainConfig fields; `overrides` as key=value, model
    fields as `model__d_model=...`) to its token budget; returns the final record."""
    from finemoe.train.config import TrainConfig, apply_overrides
    from finemoe.train.trainer import train as run

    pairs = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    if isinstance(config, dict):
        cfg = TrainConfig.from_dict(apply_overrides(config, pairs))
    else:
        cfg = TrainConfig.from_yaml(config, pairs)
    return run(cfg, resume=resume, quiet=quiet)
