"""Configuration dataclasses, validated on construction so a bad combination fails before any work starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from finemoe import schema
from finemoe.errors import ConfigError
from finemoe.schema import check_known_keys, require

FFN_KINDS = ("moe", "dense")
ROUTINGS = ("ec", "tc")
POS_EMBS = ("learned", "rope")
ACTIVATIONS = ("relu", "gelu", "silu")
CPU_MATMULS = ("mkl", "onednn")  # fp32 CPU matmul paths (finemoe.kernels.cpu_matmul); a training setting


# Beyond these a model cannot be built on any machine we know of; the check names the field instead of
# failing inside torch or numpy.
LIMITS = {
    "vocab_size": 2**24,
    "seq_len": 2**20,
    "d_model": 2**16,
    "n_blocks": 2**12,
    "n_heads": 2**12,
    "head_dim": 2**12,
    "ff_mult": 2**6,
    "expansion_rate": 2**12,
    "granularity": 2**12,
}


def from_dict(cls, data: dict[str, Any] | None, what: str):
    """Build dataclass `cls` from a mapping: unknown keys named, YAML's number styles converted, every
    value then checked against its type."""
    require(
        data is None or isinstance(data, dict), f"{what} must be a mapping of keys, got {type(data).__name__}"
    )
    data = dict(data or {})
    check_known_keys(cls, data, what)
    return cls(**schema.coerce(cls, data))


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Transformer whose FFNs are dense or fine-grained MoE layers.

    Granularity G splits each of the E expert-sized FFNs into G experts of width d_ff/G, so
    n_experts = E*G and each token still sees d_ff hidden units on average: compute per token does
    not depend on G (paper §3.1).
    """

    vocab_size: int = 8192
    seq_len: int = 256
    d_model: int = 256
    n_blocks: int = 4
    n_heads: int | None = None  # default d_model // head_dim
    head_dim: int = 64
    ffn: str = "moe"
    ff_mult: int = 4
    expansion_rate: int = 16  # E
    granularity: int = 1  # G
    routing: str = "ec"  # expert choice (paper) or token choice top-k
    capacity_factor: float = 1.0
    top_k: int | None = None  # token choice; default G
    # Expert Choice groups: the tokens at one position across this many consecutive sequences of the
    # global batch. None: the whole batch a forward sees (the paper). A fixed size makes a run the same
    # for any world size and micro-batch that it divides.
    ec_group_size: int | None = None
    moe_every: int = 1  # 1: every block MoE (paper); 2: every other block
    activation: str = "relu"
    pos_emb: str = "learned"
    moe_out_norm: bool = True  # paper: crucial for G > 1
    dense_bias: bool = True  # paper's dense FFN has biases; experts never do
    final_norm: bool = True
    init_scale: float = 0.1  # trunc normal std = sqrt(init_scale / fan_in)

    def __post_init__(self) -> None:
        schema.check(self, "model")
        for name, most in LIMITS.items():
            value = getattr(self, name)
            require(value is None or value <= most, f"model.{name} must be at most {most}, got {value}")
        require(self.head_dim >= 1, f"head_dim must be >= 1, got {self.head_dim}")
        require(
            self.n_heads is None or self.n_heads >= 1, f"n_heads must be >= 1 or null, got {self.n_heads}"
        )
        require(self.init_scale > 0, f"init_scale must be > 0, got {self.init_scale}")
        require(
            self.capacity_factor <= 1e3, f"capacity_factor must be at most 1000, got {self.capacity_factor}"
        )
        require(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        require(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        require(self.d_model >= 1 and self.n_blocks >= 1, "d_model and n_blocks must be positive")
        require(self.ffn in FFN_KINDS, f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        require(self.routing in ROUTINGS, f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        require(self.pos_emb in POS_EMBS, f"pos_emb must be one of {POS_EMBS}, got {self.pos_emb!r}")
        require(
            self.activation in ACTIVATIONS,
            f"activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )
        heads = self.heads
        require(
            heads >= 1 and self.d_model % heads == 0,
            f"d_model={self.d_model} is not divisible into {heads} heads; set n_heads or head_dim so it "
            "divides",
        )
        require(self.ff_mult >= 1, f"ff_mult must be >= 1, got {self.ff_mult}")
        require(
            self.moe_every in (1, 2),
            f"moe_every must be 1 (all blocks) or 2 (every other), got {self.moe_every}",
        )
        if self.ffn == "moe":
            require(
                self.expansion_rate >= 1 and self.granularity >= 1,
                f"expansion_rate and granularity must be >= 1 (E*G >= 1), got E={self.expansion_rate} "
                f"G={self.granularity}",
            )
            require(
                self.d_ff % self.granularity == 0,
                f"granularity G={self.granularity} must divide d_ff={self.d_ff} (expert width d_ff/G must be "
                "an integer)",
            )
            require(self.capacity_factor > 0, f"capacity_factor must be > 0, got {self.capacity_factor}")
            require(
                self.ec_group_size is None or (self.routing == "ec" and self.ec_group_size >= 1),
                f"ec_group_size must be a whole number of sequences >= 1, and only with routing: ec; got "
                f"{self.ec_group_size} with routing {self.routing!r}",
            )
            require(
                self.k_tokens_choice >= 1 and self.k_tokens_choice <= self.n_experts,
                f"top_k={self.k_tokens_choice} must be between 1 and n_experts={self.n_experts}",
            )

    @property
    def heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // self.head_dim)

    @property
    def d_ff(self) -> int:
        return self.ff_mult * self.d_model

    @property
    def n_experts(self) -> int:
        return self.expansion_rate * self.granularity

    @property
    def expert_width(self) -> int:
        return self.d_ff // self.granularity

    @property
    def k_tokens_choice(self) -> int:
        """Experts per token under token choice (default G, so active compute matches dense)."""
        return self.top_k if self.top_k is not None else self.granularity

    def is_moe_block(self, i: int) -> bool:
        """Every block is MoE (paper) or every other block, counting from the second."""
        return self.ffn == "moe" and (self.moe_every == 1 or i % 2 == 1)

    @property
    def n_moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.n_blocks))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ModelConfig":
        return from_dict(cls, data, "model")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["ModelConfig", "ConfigError", "from_dict", "check_known_keys", "require"]
