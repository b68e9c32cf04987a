"""Sampling text from a trained model, so a user can see what it learned."""

from __future__ import annotations

from pathlib import Path

import torch

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.nn.model import Transformer
from finemoe.train import checkpoint


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, dict]:
    """A model from a run folder or its ckpt.pt; also returns the training config dict."""
    ckpt = checkpoint.load(path)
    cfg = ckpt["config"]
    model = Transformer(ModelConfig.from_dict(cfg["model"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg


def training_config(path: str | Path) -> dict | None:
    """The training config beside a model: a run folder's config.json (or the one above a model
    folder), else a checkpoint's own; None for a bare model folder."""
    import json

    path = Path(path)
    for f in (path / "config.json", path.parent / "config.json"):
        if f.is_file():  # a model folder's own config.json is a ModelConfig, without data_dir
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and "data_dir" in data:
                return data
    if path.is_file() or (path / "ckpt.pt").is_file():
        return checkpoint.load(path)["config"]
    return None


def find_tokenizer(path: str | Path, train_cfg: dict | None, explicit: str | None = None) -> Path:
    """The tokenizer a run used: --tokenizer, else the copy in the run folder (or in the folder above a
    model folder), else the run's data_dir's."""
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    candidates = (
        [Path(explicit)] if explicit else [run_dir / "tokenizer.json", run_dir.parent / "tokenizer.json"]
    )
    if not explicit and train_cfg:
        candidates.append(Path(train_cfg["data_dir"]) / "tokenizer.json")
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"no tokenizer.json found (looked at {', '.join(map(str, candidates))}); pass --tokenizer PATH"
    )


@torch.no_grad()
def sample(
    model: Transformer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Autoregressive sampling; temperature 0 is greedy. The context is cropped to the model's seq_len."""
    if not ids:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.cfg.seq_len :]).logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.size(-1):
                kth = torch.topk(logits, top_k).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0].tolist()
