"""The full Transformer with MoE FFNs: parameter counts, causality, bf16 gradients, save/load."""

import pytest
import torch

from finemoe.accounting import exact_params, router_params, total_params
from finemoe.config import ModelConfig
from finemoe.nn.model import build_model, load_pretrained, save_pretrained


def _cfg(**kw):
    base = dict(vocab_size=97, seq_len=12, d_model=64, n_blocks=2, expansion_rate=4, granularity=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [{}, {"granularity": 8}, {"routing": "tc"}, {"moe_every": 2}, {"pos_emb": "rope", "moe_out_norm": False}],
)
def test_param_count_matches_accounting_and_paper_formula(kw):
    cfg = _cfg(**kw)
    model = build_model(cfg)
    assert model.num_params() == exact_params(cfg)["total"]
    if cfg.moe_every == 1:
        d, n = cfg.d_model, cfg.n_blocks
        matrices = sum(
            p.numel()
            for name, p in model.named_parameters()
            if "experts" in name or ("attn" in name and p.dim() == 2)
        )
        assert matrices == total_params(d, n, cfg.expansion_rate)  # d^2 (8E + 4) n
        routers = sum(p.numel() for name, p in model.named_parameters() if "router" in name)
        assert routers == router_params(d, n, cfg.expansion_rate, cfg.granularity)


@pytest.mark.parametrize("routing", ["ec", "tc"])
def test_moe_model_is_causal_across_the_batch(routing):
    """Changing token t of one sequence never changes any sequence's logits before t.

    Expert Choice groups tokens by position across the batch, so a later token can change routing
    only at its own and later positions."""
    torch.manual_seed(0)
    model = build_model(_cfg(routing=routing, expansion_rate=2)).eval()
    idx = torch.randint(0, 97, (4, 12))
    base = model(idx).logits
    for t in (3, 7):
        idx2 = idx.clone()
        idx2[1, t] = (idx2[1, t] + 1) % 97
        out = model(idx2).logits
        torch.testing.assert_close(
            out[:, :t], base[:, :t], atol=1e-5, rtol=0
        )  # bitwise up to kernel blocking
        assert not torch.allclose(out[1, t:], base[1, t:])


def test_moe_model_grads_finite_under_bf16_autocast():
    torch.manual_seed(0)
    for routing in ("ec", "tc"):
        model = build_model(_cfg(routing=routing))
        idx = torch.randint(0, 97, (4, 12))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(idx, idx)
            loss = out.loss + 0.01 * out.aux["lb_loss"] + 0.001 * out.aux["z_loss"]
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert out.aux["load"].shape == (2, model.cfg.n_experts)


def test_moe_model_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg(routing="tc"))
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    idx = torch.randint(0, 97, (2, 12))
    assert torch.equal(model(idx).logits, again(idx).logits)
