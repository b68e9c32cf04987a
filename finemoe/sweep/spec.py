"""A sweep spec (YAML) and its expansion into one training config per run.

A spec names model sizes, granularities G, the expansion rate E, token budgets D and seeds; every
(size, D, seed) gets one run per G plus, if asked, a dense baseline. Each run's config is the dict
`TrainConfig.from_dict` takes, and its run_id is a hash of that config (without out_dir, which is
derived from the id), so the same run always has the same id and a restarted sweep skips it.

Relative paths in a spec (data_dir, runs_dir, store, csv) are relative to the working directory, as
for every other command.

    name: quickstart
    data_dir: data               # tokenized corpus (`finemoe data prepare`)
    runs_dir: runs/quickstart    # one folder per run: checkpoints, logs, final.json
    store: runs/quickstart/results.sqlite   # default: <runs_dir>/results.sqlite
    csv: null                    # if set, the store is exported here after every finished run
    model: {vocab_size: 8192, seq_len: 128, expansion_rate: 8}   # shared ModelConfig fields
    train: {batch_size: 16, lr: 1.0e-3}                          # shared TrainConfig fields
    sizes:                       # each entry may override model fields, tokens or granularities
      - {d_model: 64, n_blocks: 2, tokens: [2.0e5, 4.0e5]}
    granularities: [1, 2, 4]
    tokens: [2.0e5, 4.0e5]
    dense: true                  # a dense baseline per (size, D, seed)
    seeds: [0]
    executor: {kind: local, workers: 1}                           # or slurm: {...}
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError

TOP_KEYS = {
    "name", "description", "data_dir", "runs_dir", "store", "csv", "model", "train", "sizes",
    "granularities", "tokens", "dense", "seeds", "executor", "trainer",
}
SIZE_KEYS = {"tokens", "granularities", "dense", "name"}
DEFAULT_TRAINER = "finemoe.sweep.runner:train_run"
_MODEL_DEFAULTS = ModelConfig().to_dict()
_MISSING = object()


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its id, its label and the config the trainer takes."""

    run_id: str
    label: str
    config: dict[str, Any]


@dataclass
class Spec:
    name: str
    data_dir: str
    runs_dir: str
    store: str
    csv: str | None
    runs: list[Run]
    executor: dict[str, Any] = field(default_factory=dict)
    trainer: str = DEFAULT_TRAINER
    source: str = ""


def config_hash(config: dict[str, Any]) -> str:
    """Stable id of a run config: sha256 of its canonical JSON.

    out_dir is excluded (it is derived from the id), so is cpu_matmul (the CPU kernels: float rounding
    only, so switching it does not re-run a sweep), and model fields at their ModelConfig default are
    dropped, so a field added to ModelConfig later does not change the id of every finished run.
    """
    c = {k: v for k, v in config.items() if k not in ("out_dir", "cpu_matmul")}
    if isinstance(c.get("model"), dict):
        c["model"] = {k: v for k, v in c["model"].items() if _MODEL_DEFAULTS.get(k, _MISSING) != v}
    blob = json.dumps(c, sort_keys=True, separators=(",", ":"), default=_canon)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _canon(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable in a run config: {type(x).__name__}")


def _number(x: Any, what: str) -> float:
    # YAML 1.1 reads "1e6" as a string; accept it rather than fail on a style choice.
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {x!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise ConfigError(f"{what} must be positive and finite, got {x!r}")
    return v


def _list(x: Any, what: str) -> list:
    if x is None:
        return []
    if not isinstance(x, (list, tuple)):
        x = [x]
    return list(x)


def _check_train(config: dict[str, Any]) -> None:
    """Validate against the trainer's config class when it is installed; the model is always checked."""
    try:
        from finemoe.train.config import TrainConfig
    except ImportError:
        return
    TrainConfig.from_dict(copy.deepcopy(config))


def expand(raw: dict[str, Any], source: str = "<spec>") -> Spec:
    """Expand a parsed spec into runs; every problem is a one-line ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep spec must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(TOP_KEYS)}")
    name = str(raw.get("name") or Path(source).stem)
    data_dir = raw.get("data_dir")
    if not data_dir:
        raise ConfigError(f"{source}: 'data_dir' is required (the folder `finemoe data prepare` wrote)")
    runs_dir = str(raw.get("runs_dir") or f"runs/{name}")
    store = str(raw.get("store") or f"{runs_dir}/results.sqlite")
    model_base = dict(raw.get("model") or {})
    train_base = dict(raw.get("train") or {})
    for bad in ("model", "data_dir", "out_dir", "tokens", "seed"):
        if bad in train_base:
            raise ConfigError(f"{source}: 'train.{bad}' is set by the sweep; use the spec's top-level keys instead")
    sizes = raw.get("sizes")
    if not sizes or not isinstance(sizes, list):
        raise ConfigError(f"{source}: 'sizes' must be a non-empty list such as [{{d_model: 64, n_blocks: 2}}]")
    seeds = [int(s) for s in _list(raw.get("seeds", [0]), "seeds")] or [0]

    runs: list[Run] = []
    seen: set[str] = set()
    for i, size in enumerate(sizes):
        if not isinstance(size, dict):
            raise ConfigError(f"{source}: sizes[{i}] must be a mapping such as {{d_model: 64, n_blocks: 2}}")
        model_over = {k: v for k, v in size.items() if k not in SIZE_KEYS}
        tokens = _list(size.get("tokens", raw.get("tokens")), "tokens")
        if not tokens:
            raise ConfigError(f"{source}: no token budgets for sizes[{i}]; set 'tokens' at the top or in the size")
        gs = [int(g) for g in _list(size.get("granularities", raw.get("granularities")), "granularities")]
        dense = bool(size.get("dense", raw.get("dense", False)))
        if not gs and not dense:
            raise ConfigError(f"{source}: sizes[{i}] has no granularities and no dense baseline; nothing to run")
        variants = ([{"ffn": "dense"}] if dense else []) + [{"ffn": "moe", "granularity": g} for g in gs]
        for d in tokens:
            d = int(round(_number(d, f"sizes[{i}] tokens")))
            for seed in seeds:
                for var in variants:
                    model = {**model_base, **model_over, **var}
                    try:
                        mc = ModelConfig.from_dict(model)
                    except ConfigError as e:
                        raise ConfigError(f"{source}: sizes[{i}] {var}: {e}") from None
                    config = {**copy.deepcopy(train_base), "model": mc.to_dict(), "data_dir": str(data_dir),
                              "tokens": d, "seed": seed}
                    run_id = config_hash(config)
                    if run_id in seen:
                        continue  # the same run listed twice (e.g. overlapping sizes) runs once
                    seen.add(run_id)
                    config["out_dir"] = str(Path(runs_dir) / run_id)
                    _check_train(config)
                    runs.append(Run(run_id, run_label(config), config))
    executor = dict(raw.get("executor") or {})
    return Spec(name=name, data_dir=str(data_dir), runs_dir=runs_dir, store=store, csv=raw.get("csv"),
                runs=runs, executor=executor, trainer=str(raw.get("trainer") or DEFAULT_TRAINER), source=source)


def run_label(config: dict[str, Any]) -> str:
    m = config["model"]
    kind = "dense" if m["ffn"] == "dense" else f"E{m['expansion_rate']}G{m['granularity']}"
    return f"d{m['d_model']}x{m['n_blocks']} {kind} D={config['tokens']:.3g} s{config['seed']}"


def load(path: str | Path) -> Spec:
    """Read a spec file, or a spec shipped with the package by name (e.g. 'quickstart')."""
    import yaml

    p = Path(path)
    if not p.is_file():
        builtin = resources.files("finemoe.sweep") / "specs" / f"{p.name.removesuffix('.yaml')}.yaml"
        if p.suffix in ("", ".yaml") and builtin.is_file():
            return expand(yaml.safe_load(builtin.read_text()), source=p.name)
        raise ConfigError(f"sweep spec {path} not found; give a YAML file or a built-in name such as 'quickstart'")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
    return expand(raw, source=str(path))
