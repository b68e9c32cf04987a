"""Parameter and FLOPs counts: the paper's formulas (§1, §5) and exact counts of our model.

Pure math, no torch, so the planner and the fit can share it. The paper-formula functions accept
floats and numpy arrays (the planner solves over a continuous d_model).

Paper definitions (d = d_model, n = n_blocks):
  N_act = 12 d^2 n                       active non-embedding params (attention 4d^2 + FFN 8d^2)
  N     = d^2 (8E + 4) n                 total non-embedding params, router excluded (dense: E = 1)
  router params = d E G per MoE block
  F     = (12 d^2 c_f + d E G c_r) D n   training FLOPs, c_f = 6, c_r = 14; dense F = 6 N D
"""

from __future__ import annotations

from typing import Any

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError

C_F = 6.0
C_R = 14.0
ASPECT = 64.0  # d_model = 64 * n_blocks, the paper's shape assumption


def active_params(d_model, n_blocks):
    return 12 * d_model**2 * n_blocks


def total_params(d_model, n_blocks, expansion_rate=1):
    """Total non-embedding params; expansion_rate=1 gives the dense count 12 d^2 n."""
    return d_model**2 * (8 * expansion_rate + 4) * n_blocks


def router_params(d_model, n_blocks, expansion_rate, granularity):
    return d_model * expansion_rate * granularity * n_blocks


def flops_per_token(d_model, n_blocks, expansion_rate=1, granularity=0, c_f=C_F, c_r=C_R):
    """Training FLOPs per token (Eq. 10); granularity=0 means dense (no router)."""
    return (12 * d_model**2 * c_f + d_model * expansion_rate * granularity * c_r) * n_blocks


def training_flops(d_model, n_blocks, tokens, expansion_rate=1, granularity=0, c_f=C_F, c_r=C_R):
    return flops_per_token(d_model, n_blocks, expansion_rate, granularity, c_f, c_r) * tokens


def tokens_for_flops(flops, d_model, n_blocks, expansion_rate=1, granularity=0, c_f=C_F, c_r=C_R):
    return flops / flops_per_token(d_model, n_blocks, expansion_rate, granularity, c_f, c_r)


def n_blocks_for(d_model, aspect=ASPECT):
    """Continuous n_blocks under the paper's shape d_model = aspect * n_blocks."""
    return d_model / aspect


def d_model_for_active(n_act, aspect=ASPECT):
    """Inverse of N_act = 12 d^2 (d / aspect): the paper's d* = (64 N_act / 12)^(1/3)."""
    return (aspect * n_act / 12.0) ** (1.0 / 3.0)


def d_model_for_total(n_total, expansion_rate=1, aspect=ASPECT):
    """Inverse of N = (8E + 4) d^2 (d / aspect); expansion_rate=1 is the dense model."""
    return (aspect * n_total / (8 * expansion_rate + 4)) ** (1.0 / 3.0)


def expert_width(d_model: int, granularity: int, ff_mult: int = 4) -> int:
    d_ff = ff_mult * d_model
    if granularity < 1 or d_ff % granularity:
        raise ConfigError(
            f"granularity G={granularity} must divide d_ff={d_ff}; pick G among the divisors of d_ff"
        )
    return d_ff // granularity


def paper_counts(cfg: ModelConfig, c_f: float = C_F, c_r: float = C_R) -> dict[str, Any]:
    """The paper's counts for a model config; blocks with a dense FFN count as E=1 without router."""
    d, n_moe = cfg.d_model, cfg.n_moe_blocks
    n_dense = cfg.n_blocks - n_moe
    E, G = cfg.expansion_rate, cfg.granularity
    moe = cfg.ffn == "moe"
    return {
        "active_params": int(active_params(d, cfg.n_blocks)),
        "total_params": int(total_params(d, n_dense) + (total_params(d, n_moe, E) if moe else 0)),
        "router_params": int(router_params(d, n_moe, E, G)) if moe else 0,
        "flops_per_token": float(
            flops_per_token(d, n_dense, c_f=c_f) + flops_per_token(d, n_moe, E, G, c_f, c_r)
        ),
        "n_experts": cfg.n_experts if moe else 0,
        "expert_width": cfg.expert_width if moe else cfg.d_ff,
    }


def exact_params(cfg: ModelConfig) -> dict[str, int]:
    """Every parameter our model instantiates, by kind; must equal the module's numel (tested)."""
    d, V = cfg.d_model, cfg.vocab_size
    ln = 2 * d
    out = {"embedding": V * d + (cfg.seq_len * d if cfg.pos_emb == "learned" else 0), "head": V * d}
    out["attention"] = 4 * d * d * cfg.n_blocks
    out["norms"] = 2 * ln * cfg.n_blocks + (ln if cfg.final_norm else 0)
    ffn = router = 0
    for i in range(cfg.n_blocks):
        if cfg.is_moe_block(i):
            ffn += 2 * cfg.n_experts * cfg.expert_width * d
            router += d * cfg.n_experts
            out["norms"] += ln if cfg.moe_out_norm else 0
        else:
            ffn += 2 * d * cfg.d_ff + ((cfg.d_ff + d) if cfg.dense_bias else 0)
    out["ffn"], out["router"] = ffn, router
    out["non_embedding"] = out["attention"] + ffn + out["norms"]
    out["total"] = sum(out[k] for k in ("embedding", "head", "attention", "norms", "ffn", "router"))
    return out


def exact_flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    """Training FLOPs per token (forward x3), including what the paper leaves out, reported apart.

    Matmuls cost 2 FLOPs per weight per token forward and twice that backward. Attention scores follow
    Kaplan et al. (QK^T and AV over the full context, 2*2*T*d forward per layer). The MoE FFN counts the
    hidden units a token actually uses on average: capacity_factor*d_ff under expert choice, top_k
    expert widths under token choice. The router counts its matmul only; the paper's c_r=14 also charges
    dispatch and combine.
    """
    d, T, V = cfg.d_model, cfg.seq_len, cfg.vocab_size
    ffn = router = 0.0
    for i in range(cfg.n_blocks):
        if cfg.is_moe_block(i):
            hidden = (
                cfg.capacity_factor * cfg.d_ff
                if cfg.routing == "ec"
                else cfg.k_tokens_choice * cfg.expert_width
            )
            ffn += 3 * 2 * 2 * d * hidden
            router += 3 * 2 * d * cfg.n_experts
        else:
            ffn += 3 * 2 * 2 * d * cfg.d_ff
    out = {
        "attention_proj": 3 * 2 * 4 * d * d * cfg.n_blocks,
        "ffn": ffn,
        "router": router,
        "attention_scores": 3 * 2 * 2 * T * d * cfg.n_blocks,
        "embedding_head": 3 * 2 * d * V,
    }
    out["total"] = sum(out.values())
    out["paper"] = paper_counts(cfg)["flops_per_token"]
    return out


def moe_ffn_matmul_ratio(cfg: ModelConfig) -> float:
    """Matmul FLOPs per token of cfg's MoE FFN (router included) over those of its dense FFN: the
    MoE/dense time ratio if nothing but the matmuls took time."""
    f = exact_flops_per_token(cfg)
    return (f["ffn"] + f["router"]) / exact_flops_per_token(cfg.replace(ffn="dense"))["ffn"]
