"""Export a trained model as a Hugging Face transformers model folder.

A dense model with learned positions is a GPT-2: it exports as a standard GPT2LMHeadModel (untied head,
zero biases where finemoe has none), loadable with no extra code. Every other model (MoE, RoPE) exports
with its modeling code (finemoe/export/remote/), which transformers loads with trust_remote_code=True.
Either way the logits are finemoe's eval-mode logits, to float rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.io import ensure_dir, write_json_atomic
from finemoe.nn.model import Transformer, load_pretrained
from finemoe.nn.moe import MoE

REMOTE = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_finemoe.py", "modeling_finemoe.py")


def model_folder(source: str | Path) -> Path:
    """A run folder's `model/` or a model folder itself (config.json + model.safetensors)."""
    source = Path(source)
    for folder in (source / "model", source):
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            return folder
    raise ConfigError(
        f"{source} holds no finished model (config.json + model.safetensors); point at a run folder whose "
        "training finished, or at its model/ folder"
    )


def export_hf(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the model in `source` to `out` as a transformers folder; returns what was written."""
    folder, out = model_folder(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; export into a new folder")
    model = load_pretrained(folder)
    cfg = model.cfg
    uncalibrated = [
        m for m in model.modules() if isinstance(m, MoE) and m.cfg.routing == "ec" and not m.calibrated
    ]
    if uncalibrated:
        raise ConfigError(
            f"{folder} has Expert Choice layers without inference thresholds (trained before they were "
            "kept); set them with finemoe.nn.moe.calibrate(model, batches) and save the model first"
        )
    ensure_dir(out, "export folder")
    kind = "gpt2" if _is_gpt2(cfg) else "finemoe"
    (_write_gpt2 if kind == "gpt2" else _write_remote)(model, out)
    tokenizer = next(
        (p for p in (folder / "tokenizer.json", folder.parent / "tokenizer.json") if p.is_file()), None
    )
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        write_json_atomic(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})
    return {"format": kind, "out": str(out), "files": sorted(p.name for p in out.iterdir())}


def _is_gpt2(cfg: ModelConfig) -> bool:
    return (
        cfg.ffn == "dense"
        and cfg.pos_emb == "learned"
        and cfg.final_norm
        and cfg.activation
        in (
            "relu",
            "gelu",
            "silu",
        )
    )


def _write_gpt2(model: Transformer, out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    conf = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_blocks,
        n_head=cfg.heads,
        n_inner=cfg.d_ff,
        activation_function=cfg.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )
    src = model.state_dict()
    d = cfg.d_model
    state = {
        "transformer.wte.weight": src["tok_emb.weight"],
        "transformer.wpe.weight": src["pos_emb.weight"],
        "transformer.ln_f.weight": src["ln_f.weight"],
        "transformer.ln_f.bias": src["ln_f.bias"],
        "lm_head.weight": src["head.weight"],
    }
    for i in range(cfg.n_blocks):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        # GPT-2's Conv1D keeps weights as [in, out]
        state |= {
            h + "ln_1.weight": src[a + "ln1.weight"],
            h + "ln_1.bias": src[a + "ln1.bias"],
            h + "ln_2.weight": src[a + "ln2.weight"],
            h + "ln_2.bias": src[a + "ln2.bias"],
            h + "attn.c_attn.weight": src[a + "attn.qkv.weight"].t(),
            h + "attn.c_attn.bias": torch.zeros(3 * d),
            h + "attn.c_proj.weight": src[a + "attn.proj.weight"].t(),
            h + "attn.c_proj.bias": torch.zeros(d),
            h + "mlp.c_fc.weight": src[a + "ffn.fc1.weight"].t(),
            h + "mlp.c_fc.bias": src.get(a + "ffn.fc1.bias", torch.zeros(cfg.d_ff)),
            h + "mlp.c_proj.weight": src[a + "ffn.fc2.weight"].t(),
            h + "mlp.c_proj.bias": src.get(a + "ffn.fc2.bias", torch.zeros(d)),
        }
    hf = GPT2LMHeadModel(conf)
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:  # a transformers release that renamed GPT-2's weights
        raise ConfigError(
            f"GPT-2 export does not match this transformers: missing {missing}, extra {unexpected}"
        )
    hf.save_pretrained(out)


def _write_remote(model: Transformer, out: Path) -> None:
    from safetensors.torch import save_file

    cfg = model.cfg
    config = {
        "architectures": ["FinemoeForCausalLM"],
        "model_type": "finemoe",
        "auto_map": {
            "AutoConfig": "configuration_finemoe.FinemoeConfig",
            "AutoModelForCausalLM": "modeling_finemoe.FinemoeForCausalLM",
        },
        "vocab_size": cfg.vocab_size,
        "seq_len": cfg.seq_len,
        "d_model": cfg.d_model,
        "n_blocks": cfg.n_blocks,
        "n_heads": cfg.heads,
        "d_ff": cfg.d_ff,
        "ffn": cfg.ffn,
        "moe_every": cfg.moe_every,
        "n_experts": cfg.n_experts,
        "expert_width": cfg.expert_width,
        "routing": cfg.routing,
        "experts_per_token": cfg.k_tokens_choice,
        "activation": cfg.activation,
        "pos_emb": cfg.pos_emb,
        "moe_out_norm": cfg.moe_out_norm,
        "dense_bias": cfg.dense_bias,
        "final_norm": cfg.final_norm,
        "tie_word_embeddings": False,
        "finemoe_config": cfg.to_dict(),
    }
    write_json_atomic(out / "config.json", config)
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE / name, out / name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
