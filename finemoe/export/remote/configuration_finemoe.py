"""The configuration of a finemoe fine-grained MoE model, for transformers."""

from transformers import PretrainedConfig


class FinemoeConfig(PretrainedConfig):
    model_type = "finemoe"

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 256,
        d_model: int = 256,
        n_blocks: int = 4,
        n_heads: int = 4,
        d_ff: int = 1024,
        ffn: str = "moe",
        moe_every: int = 1,
        n_experts: int = 16,
        expert_width: int = 64,
        routing: str = "ec",
        experts_per_token: int = 1,
        activation: str = "relu",
        pos_emb: str = "learned",
        moe_out_norm: bool = True,
        dense_bias: bool = True,
        final_norm: bool = True,
        **kwargs,
    ):
        self.vocab_size, self.seq_len, self.d_model, self.n_blocks = vocab_size, seq_len, d_model, n_blocks
        self.n_heads, self.d_ff, self.ffn, self.moe_every = n_heads, d_ff, ffn, moe_every
        self.n_experts, self.expert_width = n_experts, expert_width
        self.routing, self.experts_per_token = routing, experts_per_token  # Token Choice's top-k
        self.activation, self.pos_emb = activation, pos_emb
        self.moe_out_norm, self.dense_bias, self.final_norm = moe_out_norm, dense_bias, final_norm
        # the names transformers' generation and pipelines look for
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = d_model, n_blocks, n_heads
        self.max_position_embeddings = seq_len
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
