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

An iso-FLOP spec gives `budgets` (paper FLOPs, c_f·N_act·D plus the router; with `flops: exact`,
every matmul FLOP, embedding and head included) instead of `tokens`, at the top or per size; each run's
tokens are then the whole steps its budget buys, and the run keeps its budget. With `branches: true`
(and `train: {schedule: wsd}`), the longest run of each (size, FFN, seed) is a stable run that saves a
snapshot at every shorter run's decay start, and each shorter run starts from that snapshot: a cooldown
branch, recorded with its parent.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from finemoe.accounting import exact_flops_per_token, paper_counts
from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.io import read_text
from finemoe.train.config import TrainConfig

EXECUTORS = ("local", "inprocess", "slurm", "submitit-local")


def check_executor(kind: Any, where: str) -> None:
    """Named before any store or folder is created."""
    if kind not in EXECUTORS:
        raise ConfigError(f"{where}: unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")


TOP_KEYS = {
    "name",
    "description",
    "data_dir",
    "runs_dir",
    "store",
    "csv",
    "model",
    "train",
    "sizes",
    "granularities",
    "tokens",
    "budgets",
    "flops",
    "branches",
    "dense",
    "seeds",
    "executor",
    "trainer",
}
SIZE_KEYS = {"tokens", "budgets", "granularities", "dense", "name"}
# Train keys that do not change what a run computes, so they stay out of its id.
# What a compute budget counts: the paper's FLOPs (non-embedding matmuls and the router, c_f = 6), or every
# matmul FLOP including the embedding and head and attention's scores (accounting.exact_flops_per_token),
# which tiny models with a large vocabulary need: there the embedding and head are most of the cost.
FLOPS_MODELS = ("paper", "exact")
NOT_IDENTITY = ("out_dir", "cpu_matmul", "snapshot_steps", "init_from", "log_every", "log")
DEFAULT_TRAINER = "finemoe.sweep.runner:train_run"
_MODEL_DEFAULTS = ModelConfig().to_dict()

_MISSING = object()


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its id, its label and the config the trainer takes."""

    run_id: str
    label: str
    config: dict[str, Any]
    budget: float | None = None  # the compute budget (paper FLOPs) an iso-FLOP spec gave this run
    parent: str | None = None  # the stable run a cooldown branch starts from


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
    only, so switching it does not re-run a sweep), and so are a branch's snapshot settings (a branch
    computes the same from its parent's snapshot as from step 0). Model fields at their ModelConfig
    default are dropped, so a field added to ModelConfig later does not change the id of every finished run.
    """
    c = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
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
    TrainConfig.from_dict(copy.deepcopy(config))


def expand(raw: dict[str, Any], source: str = "<spec>") -> Spec:
    """Expand a parsed spec into runs; every problem is a one-line ConfigError naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a sweep spec must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(TOP_KEYS)}")
    for key in ("name", "data_dir", "runs_dir", "store", "csv", "trainer", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{source}: '{key}' must be a text (a name or a path), got {raw[key]!r}")
    for key in ("model", "train", "executor"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(
                f"{source}: '{key}' must be a mapping of keys, such as {key}: {{...}}, got {raw[key]!r}"
            )
    name = str(raw.get("name") or Path(source).stem)
    data_dir = raw.get("data_dir")
    if not data_dir:
        raise ConfigError(f"{source}: 'data_dir' is required (the folder `finemoe data prepare` wrote)")
    runs_dir = str(raw.get("runs_dir") or f"runs/{name}")
    store = str(raw.get("store") or f"{runs_dir}/results.sqlite")
    model_base = dict(raw.get("model") or {})
    train_base = dict(raw.get("train") or {})
    if train_base.get("stop_at_step") is not None:
        raise ConfigError(
            f"{source}: train.stop_at_step ends one `finemoe train` invocation; a sweep trains its runs to "
            "the end (cluster jobs resume from their checkpoints by themselves): remove it"
        )
    executor = dict(raw.get("executor") or {})
    check_executor(executor.get("kind", "local"), f"{source}: executor.kind")
    for key in ("workers", "threads"):
        if executor.get(key) is not None and _whole(executor[key], f"executor.{key}") < 1:
            raise ConfigError(f"{source}: executor.{key} must be >= 1, got {executor[key]!r}")
    for bad in ("model", "data_dir", "out_dir", "tokens", "seed"):
        if bad in train_base:
            raise ConfigError(
                f"{source}: 'train.{bad}' is set by the sweep; use the spec's top-level keys instead"
            )
    sizes = raw.get("sizes")
    if not sizes or not isinstance(sizes, list):
        raise ConfigError(
            f"{source}: 'sizes' must be a non-empty list such as [{{d_model: 64, n_blocks: 2}}]"
        )
    seeds = [_whole(s, "seeds") for s in _list(raw.get("seeds", [0]), "seeds")] or [0]

    branches = raw.get("branches", False)
    if not isinstance(branches, bool):
        raise ConfigError(f"{source}: 'branches' must be true or false, got {branches!r}")
    if branches and train_base.get("schedule") != "wsd":
        raise ConfigError(
            f"{source}: 'branches: true' needs train: {{schedule: wsd}} (a cosine run cannot be branched)"
        )
    batch_size = _whole(train_base.get("batch_size", TrainConfig().batch_size), "train.batch_size")
    flops_model = raw.get("flops", "paper")
    if flops_model not in FLOPS_MODELS:
        raise ConfigError(
            f"{source}: 'flops' must be one of {', '.join(FLOPS_MODELS)} (what a budget counts), "
            f"got {flops_model!r}"
        )

    drafts: list[dict[str, Any]] = []  # configs before ids: branches still change them
    for i, size in enumerate(sizes):
        if not isinstance(size, dict):
            raise ConfigError(f"{source}: sizes[{i}] must be a mapping such as {{d_model: 64, n_blocks: 2}}")
        model_over = {k: v for k, v in size.items() if k not in SIZE_KEYS}
        tokens = _list(size.get("tokens", raw.get("tokens")), "tokens")
        budgets = _list(size.get("budgets", raw.get("budgets")), "budgets")
        if tokens and budgets:
            raise ConfigError(f"{source}: sizes[{i}] has both token budgets and compute budgets; give one")
        if not tokens and not budgets:
            raise ConfigError(
                f"{source}: no token or compute budgets for sizes[{i}]; set 'tokens' or 'budgets'"
            )
        gs = [
            _whole(g, f"sizes[{i}] granularities")
            for g in _list(size.get("granularities", raw.get("granularities")), "granularities")
        ]
        dense = size.get("dense", raw.get("dense", False))
        if not isinstance(dense, bool):
            raise ConfigError(f"{source}: sizes[{i}] 'dense' must be true or false, got {dense!r}")
        if not gs and not dense:
            raise ConfigError(
                f"{source}: sizes[{i}] has no granularities and no dense baseline; nothing to run"
            )
        variants = ([{"ffn": "dense"}] if dense else []) + [{"ffn": "moe", "granularity": g} for g in gs]
        for var in variants:
            model = {**model_base, **model_over, **var}
            try:
                mc = ModelConfig.from_dict(model)
            except ConfigError as e:
                raise ConfigError(f"{source}: sizes[{i}] {var}: {e}") from None
            step = batch_size * mc.seq_len
            per_token = (
                paper_counts(mc)["flops_per_token"]
                if flops_model == "paper"
                else exact_flops_per_token(mc)["total"]
            )
            lengths = [(int(round(_number(d, f"sizes[{i}] tokens"))), None) for d in tokens]
            for f in budgets:
                f = _number(f, f"sizes[{i}] budgets")
                d = int(f / per_token // step) * step
                if d < step:
                    raise ConfigError(
                        f"{source}: sizes[{i}] {var}: budget {f:.3g} FLOPs buys less than one step "
                        f"({step * per_token:.3g} FLOPs); raise the budget or drop the size"
                    )
                lengths.append((d, f))
            for d, f in lengths:
                for seed in seeds:
                    config = {
                        **copy.deepcopy(train_base),
                        "model": mc.to_dict(),
                        "data_dir": str(data_dir),
                        "tokens": d,
                        "seed": seed,
                    }
                    drafts.append({"config": config, "budget": f, "parent": None})
    if branches:
        _branch(drafts, runs_dir)

    runs: list[Run] = []
    seen: set[str] = set()
    ids = {id(dr): config_hash(dr["config"]) for dr in drafts}
    for dr in drafts:
        run_id, config = ids[id(dr)], dr["config"]
        if run_id in seen:
            continue  # the same run listed twice (e.g. overlapping sizes) runs once
        seen.add(run_id)
        config["out_dir"] = str(Path(runs_dir) / run_id)
        _check_train(config)
        parent = ids[id(dr["parent"])] if dr["parent"] is not None else None
        runs.append(Run(run_id, run_label(config, dr["budget"]), config, dr["budget"], parent))
    return Spec(
        name=name,
        data_dir=str(data_dir),
        runs_dir=runs_dir,
        store=store,
        csv=raw.get("csv"),
        runs=runs,
        executor=executor,
        trainer=str(raw.get("trainer") or DEFAULT_TRAINER),
        source=source,
    )


def _branch(drafts: list[dict[str, Any]], runs_dir: str) -> None:
    """Make the longest run of each group the stable parent of the others (in place, parents first).

    All runs of a group share the parent's warmup (a fixed number of tokens), so each shorter run's
    schedule equals the parent's up to its own decay start, where the parent saves a snapshot for it.
    """
    groups: dict[str, dict[int, dict[str, Any]]] = {}
    for dr in drafts:  # a group: the same model and seed; one member per length (a repeat is one run)
        key = json.dumps(
            {k: v for k, v in dr["config"].items() if k != "tokens"}, sort_keys=True, default=str
        )
        groups.setdefault(key, {}).setdefault(dr["config"]["tokens"], dr)
    ordered = []
    for by_length in groups.values():
        members = [by_length[t] for t in sorted(by_length, reverse=True)]
        head = members[0]["config"]
        if head.get("warmup_tokens") is None:
            longest = TrainConfig.from_dict(copy.deepcopy(head))
            warmup = longest.warmup_steps * longest.tokens_per_step
            for dr in members:
                dr["config"]["warmup_tokens"] = warmup
        parent_dir = Path(runs_dir) / config_hash(head)
        stable = TrainConfig.from_dict(copy.deepcopy(head)).lr_multiplier()
        starts = []
        for dr in members[1:]:
            cfg = TrainConfig.from_dict(copy.deepcopy(dr["config"]))
            start, ours = cfg.decay_start, cfg.lr_multiplier()
            if any(ours(s) != stable(s) for s in range(start)):
                raise ConfigError(
                    f"the {cfg.tokens}-token run cannot branch from the {head['tokens']}-token run: "
                    "their LR schedules differ before its decay; give them one warmup_tokens"
                )
            starts.append(start)
            dr["config"]["init_from"] = str(parent_dir / "snapshots" / f"step_{start}.pt")
            dr["parent"] = members[0]
        head["snapshot_steps"] = sorted(set(starts))
        ordered += members
    drafts[:] = ordered


def _whole(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ConfigError(f"{what} must be whole numbers, got {x!r}")
    try:
        v = float(x)
    except ValueError:
        raise ConfigError(f"{what} must be whole numbers, got {x!r}") from None
    if not v.is_integer():
        raise ConfigError(f"{what} must be whole numbers, got {x!r}")
    return int(v)


def run_label(config: dict[str, Any], budget: float | None = None) -> str:
    m = config["model"]
    kind = "dense" if m["ffn"] == "dense" else f"E{m['expansion_rate']}G{m['granularity']}"
    compute = f" F={budget:.3g}" if budget is not None else ""
    return f"d{m['d_model']}x{m['n_blocks']} {kind} D={config['tokens']:.3g}{compute} s{config['seed']}"


def load(path: str | Path) -> Spec:
    """Read a spec file, or a spec shipped with the package by name (e.g. 'quickstart')."""
    import yaml

    p = Path(path)
    if not p.is_file():
        builtin = resources.files("finemoe.sweep") / "specs" / f"{p.name}.yaml"
        if p.suffix == "" and p.name == str(path) and builtin.is_file():  # a bare name, not a missing path
            return expand(yaml.safe_load(builtin.read_text()), source=p.name)
        raise ConfigError(
            f"sweep spec {path} not found; give a YAML file or a built-in name such as 'quickstart'"
        )
    try:
        raw = yaml.safe_load(read_text(p, "sweep spec"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
    return expand(raw, source=str(path))
