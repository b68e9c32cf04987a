"""A finemoe model for transformers: a pre-norm decoder whose FFNs are fine-grained MoE layers.

Routing is inference routing, decided per token, so a sequence's logits do not depend on its batch:
Token Choice takes each token's top-k experts; Expert Choice takes, for each expert, the tokens whose
router score reaches the threshold calibrated during training (finemoe's eval mode). Gates are the
softmax scores, unnormalised; the MoE output goes through a LayerNorm.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_finemoe import FinemoeConfig

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _rope(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _apply_rope(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: FinemoeConfig):
        super().__init__()
        self.n_heads, self.rope = cfg.n_heads, cfg.pos_emb == "rope"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class DenseFFN(nn.Module):
    def __init__(self, cfg: FinemoeConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.dense_bias)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.dense_bias)
        self.act = ACT[cfg.activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Router(nn.Module):
    def __init__(self, cfg: FinemoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))


class Experts(nn.Module):
    def __init__(self, cfg: FinemoeConfig):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.expert_width))
        self.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.expert_width, cfg.d_model))


class MoE(nn.Module):
    def __init__(self, cfg: FinemoeConfig):
        super().__init__()
        self.routing, self.k, self.act = cfg.routing, cfg.experts_per_token, ACT[cfg.activation]
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.ln = nn.LayerNorm(cfg.d_model) if cfg.moe_out_norm else nn.Identity()
        if cfg.routing == "ec":
            self.register_buffer("ec_threshold", torch.zeros(cfg.n_experts))
            self.register_buffer("ec_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        B, T, d = x.shape
        xf = x.reshape(B * T, d)
        probs = F.linear(xf.float(), self.router.weight.float()).softmax(-1)
        if self.routing == "ec":
            chosen = probs >= self.ec_threshold
        else:
            top = probs.topk(self.k, dim=-1).indices
            chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)
        y = torch.zeros_like(xf)
        for e in range(probs.shape[1]):  # one expert at a time: readable, and memory stays small
            tokens = chosen[:, e].nonzero(as_tuple=True)[0]
            if tokens.numel():
                h = self.act(xf[tokens] @ self.experts.w1[e]) @ self.experts.w2[e]
                y.index_add_(0, tokens, h * probs[tokens, e, None].to(h.dtype))
        return self.ln(y.view(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: FinemoeConfig, moe: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = MoE(cfg) if moe else DenseFFN(cfg)

    def forward(self, x, rope):
        x = x + self.attn(self.ln1(x), rope)
        return x + self.ffn(self.ln2(x))


class FinemoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FinemoeConfig
    base_model_prefix = "finemoe"
    _no_split_modules = ["Block"]

    def __init__(self, config: FinemoeConfig):
        super().__init__(config)
        cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_emb == "learned":
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        moe = [cfg.ffn == "moe" and (cfg.moe_every == 1 or i % 2 == 1) for i in range(cfg.n_blocks)]
        self.blocks = nn.ModuleList(Block(cfg, m) for m in moe)
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def forward(self, input_ids=None, labels=None, attention_mask=None, **kwargs):
        """Full-sequence forward (no KV cache); `attention_mask` is accepted for generation, which
        must pass unpadded prompts."""
        B, T = input_ids.shape
        if T > self.config.seq_len:
            raise ValueError(f"{T} tokens exceed the model's context of {self.config.seq_len}")
        x = self.tok_emb(input_ids)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.pos_emb(torch.arange(T, device=input_ids.device))
        else:  # computed here: transformers builds models on the meta device, so a buffer would be empty
            rope = tuple(t.to(x.device) for t in _rope(T, self.config.d_model // self.config.n_heads))
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.ln_f(x))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.seq_len :]}

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02 / math.sqrt(2))
