"""Tiny corpora and configs shared by the trainer tests (kept small: each run takes a second)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from finemoe.data.tokens import write_tokens

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = {"vocab_size": 64, "seq_len": 16, "d_model": 32, "head_dim": 16, "n_blocks": 2, "ffn": "dense"}


def make_data(folder: Path, n_tokens: int = 20_000, vocab: int = 64, seed: int = 0) -> Path:
    """A learnable token stream: a noisy counter, so the loss visibly falls within a few steps."""
    rng = np.random.default_rng(seed)
    ids = (
        np.arange(n_tokens) % vocab + (rng.random(n_tokens) < 0.1) * rng.integers(0, vocab, n_tokens)
    ) % vocab
    folder.mkdir(parents=True, exist_ok=True)
    write_tokens(folder / "train.bin", ids, vocab)
    write_tokens(folder / "val.bin", ids[: n_tokens // 5][::-1].copy(), vocab)
    return folder


def tiny_config(data: Path, out: Path, steps: int = 20, batch_size: int = 4, **over) -> dict:
    model = {**TINY_MODEL, **over.pop("model", {})}
    cfg = {
        "data_dir": str(data),
        "out_dir": str(out),
        "tokens": steps * batch_size * model["seq_len"],
        "batch_size": batch_size,
        "lr": 3e-3,
        "eval_every": 10,
        "eval_batches": 2,
        "ckpt_every": 10,
        "model": model,
    }
    cfg.update(over)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run `python -m finemoe ...` from the repository root, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "finemoe", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
