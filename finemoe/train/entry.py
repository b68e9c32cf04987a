"""`finemoe.train(config)`: train a YAML config or a dict of TrainConfig fields, with overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def train(config: str | Path | dict, resume: bool = False, quiet: bool = True, **overrides: Any) -> dict:
    """Train a config (a YAML path or a dict of TrainConfig fields) to its token budget; `overrides`
    replace fields with the values as given (model fields as `model__d_model=...`). Returns the record."""
    from finemoe.train.config import TrainConfig
    from finemoe.train.trainer import train as run

    data = copy.deepcopy(config) if isinstance(config, dict) else TrainConfig.from_yaml(config).to_dict()
    for key, value in overrides.items():
        head, _, field = key.partition("__")
        if field:
            if head != "model":
                from finemoe.errors import ConfigError

                raise ConfigError(f"override {key!r}: only model fields nest (model__<field>)")
            data["model"] = {**dict(data.get("model") or {}), field: value}
        else:
            data[key] = value
    return run(TrainConfig.from_dict(data), resume=resume, quiet=quiet)
