import pytest

from finemoe import accounting as acc
from finemoe.config import ModelConfig
from finemoe.errors import ConfigError


@pytest.mark.parametrize(
    "d, n, total, active",
    [
        (256, 4, 135_266_304, 3_145_728),
        (512, 8, 1_082_130_432, 25_165_824),
        (768, 12, 3_652_190_208, 84_934_656),
    ],
)
def test_paper_parameter_checks(d, n, total, active):
    assert acc.total_params(d, n, 64) == total
    assert acc.active_params(d, n) == active


def test_dense_flops_are_six_n_d():
    d, n, D = 512, 8, 1e9
    assert acc.training_flops(d, n, D) == pytest.approx(6 * acc.active_params(d, n) * D)


def test_moe_flops_add_router_term():
    d, n, E, G = 512, 8, 64, 8
    per_block = 72 * d * d + 14 * d * E * G
    assert acc.flops_per_token(d, n, E, G) == per_block * n


def test_shape_inverse_round_trips():
    d = acc.d_model_for_active(1e9)
    assert acc.active_params(d, acc.n_blocks_for(d)) == pytest.approx(1e9)
    assert d == pytest.approx(1747.2, abs=0.1)  # paper Table 2 row 64x1B


def test_paper_counts_every_other_block():
    cfg = ModelConfig(d_model=128, n_blocks=4, expansion_rate=8, granularity=2, moe_every=2)
    c = acc.paper_counts(cfg)
    assert c["total_params"] == 128**2 * (12 * 2 + (8 * 8 + 4) * 2)
    assert c["router_params"] == 128 * 16 * 2


def test_expert_width_validation():
    assert acc.expert_width(256, 8) == 128
    with pytest.raises(ConfigError, match="divide"):
        acc.expert_width(256, 3)


def test_moe_ffn_matmul_ratio_at_the_layer_benchmark_shape():
    """G=16, E=16, d_model=512: the router adds 256 of the FFN's 2*2048 units of work, both routings
    (Expert Choice at capacity 1 and Token Choice top-G use d_ff hidden units per token, as dense)."""
    cfg = ModelConfig(d_model=512, expansion_rate=16, granularity=16)
    assert acc.moe_ffn_matmul_ratio(cfg.replace(routing="ec")) == pytest.approx(1 + 256 / 4096)
    assert acc.moe_ffn_matmul_ratio(cfg.replace(routing="tc")) == pytest.approx(1 + 256 / 4096)
    assert acc.moe_ffn_matmul_ratio(cfg.replace(routing="ec", capacity_factor=2.0)) == pytest.approx(
        2 + 256 / 4096
    )
