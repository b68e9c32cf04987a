import pytest

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError


def test_defaults_and_derived_sizes():
    cfg = ModelConfig(d_model=512, expansion_rate=16, granularity=8)
    assert cfg.heads == 8 and cfg.d_ff == 2048
    assert cfg.n_experts == 128 and cfg.expert_width == 256
    assert cfg.k_tokens_choice == 8


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(granularity=3), "must divide d_ff"),
        (dict(granularity=0), "must be >= 1"),
        (dict(routing="xx"), "routing must be"),
        (dict(d_model=100, n_heads=3), "heads"),
        (dict(top_k=10_000), "top_k"),
        (dict(moe_every=3), "moe_every"),
    ],
)
def test_invalid_combinations_name_the_problem(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**kw)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown model key"):
        ModelConfig.from_dict({"d_modle": 128})
    assert ModelConfig.from_dict({"d_model": 128}).d_model == 128
