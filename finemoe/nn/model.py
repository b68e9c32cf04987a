"""Decoder-only pre-norm Transformer with a dense or fine-grained MoE FFN in each block.

Paper setting (§2 of the notes): learned absolute positions, heads of width 64, untied head without
bias, every FFN replaced by an MoE whose output goes through a LayerNorm. RoPE is an option.

FFN contract: an FFN module maps x[B, T, d] -> (y[B, T, d], aux) where aux is a dict of scalar
tensors (`lb_loss`, `z_loss`: differentiable, unweighted) and detached diagnostics (`load`: per-expert
fraction of routed slots). Dense FFNs return an empty dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.io import atomic_path, ensure_dir, write_json_atomic
from finemoe.kernels.cpu_matmul import Linear
from finemoe.nn.activations import ACT
from finemoe.nn.init import trunc_normal_
from finemoe.nn.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


class DenseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.d_model, cfg.d_ff, bias=cfg.dense_bias)
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.dense_bias)
        self.act = ACT[cfg.activation]
        trunc_normal_(self.fc1.weight, cfg.d_model, cfg.init_scale)
        trunc_normal_(self.fc2.weight, cfg.d_ff, cfg.init_scale)
        for lin in (self.fc1, self.fc2):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.fc2(self.act(self.fc1(x))), {}


def rope_cache(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x[..., T, hd] by the angles of positions 0..T-1 ([seq_len, hd/2] tables), or by angles
    already gathered per row ([B, 1, T, hd/2], positions offset by a KV cache)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    T = x.shape[-2]
    c, s = cos[..., :T, :].to(x.dtype), sin[..., :T, :].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class KVCache:
    """Keys and values of the tokens a model has seen, so that decoding feeds only the new token.

    Per layer, k and v [B, H, seq_len, hd] are allocated on first use (in the dtype attention
    computes in) and filled from slot 0; `length` slots are filled. `pad` [B] (optional) says how
    many leading slots of each row are left padding: those keys are masked out and each row's
    positions start at its first real token, so a row's logits are those of its tokens alone. A
    forward may not go past the model's seq_len: the caller starts a new cache on a cropped context.
    """

    def __init__(self, cfg: ModelConfig, batch: int, pad: torch.Tensor | None = None):
        self.seq_len, self.batch = cfg.seq_len, batch
        self.k: list[torch.Tensor | None] = [None] * cfg.n_blocks
        self.v: list[torch.Tensor | None] = [None] * cfg.n_blocks
        self.length = 0
        self.pad = pad if pad is not None and bool(pad.any()) else None
        self.mask: torch.Tensor | None = None  # of the forward under way (see `begin`)

    def begin(self, T: int, device: torch.device) -> torch.Tensor:
        """Prepare a forward of T new tokens: the attention mask, and the positions [B or 1, T]."""
        if self.length + T > self.seq_len:
            raise ConfigError(
                f"{self.length} cached + {T} new tokens exceed the model's seq_len={self.seq_len}; "
                "start a new cache on the last seq_len tokens"
            )
        q = torch.arange(self.length, self.length + T, device=device)
        self.mask = None
        if self.pad is None:
            if self.length and T > 1:  # a chunk after a cached prefix: causal, offset
                self.mask = (torch.arange(self.length + T, device=device) <= q[:, None])[None, None]
            return q[None]
        pad = self.pad.to(device)[:, None, None]  # [B, 1, 1]
        j = torch.arange(self.length + T, device=device)
        seen = (j <= q[:, None]) & (j >= pad)  # causal, padding masked out
        self.mask = (seen | (j == q[:, None]))[:, None]  # a pad slot sees itself: no empty row, no NaN
        return (q[None] - self.pad.to(device)[:, None]).clamp_min(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's k, v [B, H, T, hd] of one layer; the keys and values seen so far."""
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.seq_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def end(self, T: int) -> None:
        """The forward under way is done: its T tokens are cached."""
        self.length += T
        self.mask = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the batch), e.g. when the others have finished."""
        self.k = [None if t is None else t.index_select(0, rows.to(t.device)) for t in self.k]
        self.v = [None if t is None else t.index_select(0, rows.to(t.device)) for t in self.v]
        self.batch = len(rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows.to(self.pad.device))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = Linear(cfg.d_model, cfg.d_model, bias=False)
        trunc_normal_(self.qkv.weight, cfg.d_model, cfg.init_scale)
        trunc_normal_(self.proj.weight, cfg.d_model, cfg.init_scale)
        self.rope = cfg.pos_emb == "rope"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # causal within a first chunk; a later single token sees every cached key; else the mask
            causal = cache.mask is None and cache.length == 0 and T > 1
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        if moe:
            self.ffn = MoE(cfg)
        else:
            self.ffn = DenseFFN(cfg)

    def forward(
        self, x: torch.Tensor, rope, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[torch.Tensor, dict]:
        x = x + self.attn(self.ln1(x), rope, cache, layer)
        y, aux = self.ffn(self.ln2(x))
        return x + y, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        trunc_normal_(self.tok_emb.weight, 1, cfg.init_scale)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
            trunc_normal_(self.pos_emb.weight, 1, cfg.init_scale)
        else:
            cos, sin = rope_cache(cfg.seq_len, cfg.d_model // cfg.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_block(i)) for i in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.final_norm else nn.Identity()
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        trunc_normal_(self.head.weight, cfg.d_model, cfg.init_scale)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> ModelOutput:
        """Logits of idx [B, T]. With a `cache`, idx continues the tokens cached there (positions offset
        by them) and its keys and values are added to it, so decoding feeds one new token per step."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ConfigError(f"sequence of {T} tokens exceeds the model's seq_len={self.cfg.seq_len}")
        x, rope = self._embed(idx, cache)
        auxes = []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, rope) if cache is None else block(x, rope, cache, i)
            if aux:
                auxes.append(aux)
        if cache is not None:
            cache.end(T)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return ModelOutput(logits, loss, _mean_aux(auxes))

    def _embed(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, tuple | None]:
        """Token embeddings plus learned positions, or the RoPE angles for attention; positions from 0,
        or per row after a cache's tokens (and its left padding)."""
        x = self.tok_emb(idx)
        if cache is None:
            if self.cfg.pos_emb == "learned":
                return x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device)), None
            return x, (self.rope_cos, self.rope_sin)
        if cache.batch != idx.shape[0]:
            raise ConfigError(f"a KV cache of {cache.batch} rows was given a batch of {idx.shape[0]}")
        pos = cache.begin(idx.shape[1], idx.device)  # [B or 1, T]
        if self.cfg.pos_emb == "learned":
            return x + self.pos_emb(pos), None
        return x, (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # [B|1, 1, T, hd/2]

    def new_cache(self, batch: int, pad: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for `batch` rows; `pad` [B]: leading padding slots of each row."""
        return KVCache(self.cfg, batch, pad)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _mean_aux(auxes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average each aux term over MoE layers; `load` becomes [n_layers, n_experts]."""
    if not auxes:
        return {}
    out = {}
    for key in auxes[0]:
        vals = [a[key] for a in auxes]
        out[key] = torch.stack(vals) if key == "load" else torch.stack(vals).mean()
    return out


def build_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)


def save_pretrained(
    model: Transformer, directory: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write config.json + model.safetensors, each atomically; `state` in place of the model's own
    (the gathered weights of a sharded model)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    ensure_dir(directory, "model folder")
    state = model.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(directory / "config.json", model.cfg.to_dict())


def load_pretrained(directory: str | Path, map_location: str = "cpu") -> Transformer:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise ConfigError(
                f"{p} not found; point at a folder written by save_pretrained (config.json + "
                "model.safetensors)"
            )
    try:
        model = Transformer(ModelConfig.from_dict(json.loads(cfg_path.read_text())))
        model.load_state_dict(load_file(str(weights), device=map_location))
    except (ValueError, RuntimeError, OSError, SafetensorError) as e:  # a cut or foreign file
        raise ConfigError(
            f"{directory} is not a readable finemoe model folder ({type(e).__name__})"
        ) from None
    return model.eval()  # a loaded model is for use; call .train() to train it further
