import torch

from finemoe.accounting import exact_params
from finemoe.config import ModelConfig
from finemoe.nn.model import build_model, load_pretrained, save_pretrained


def _cfg(**kw):
    base = dict(vocab_size=97, seq_len=16, d_model=64, n_blocks=2, ffn="dense")
    base.update(kw)
    return ModelConfig(**base)


def test_dense_param_count_matches_accounting():
    for pos in ("learned", "rope"):
        cfg = _cfg(pos_emb=pos)
        assert build_model(cfg).num_params() == exact_params(cfg)["total"]


def test_dense_model_is_causal():
    torch.manual_seed(0)
    for pos in ("learned", "rope"):
        model = build_model(_cfg(pos_emb=pos)).eval()
        idx = torch.randint(0, 97, (2, 16))
        idx2 = idx.clone()
        idx2[:, 9] = (idx2[:, 9] + 1) % 97
        a, b = model(idx).logits, model(idx2).logits
        assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
        assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg())
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m")
    idx = torch.randint(0, 97, (1, 16))
    assert torch.equal(model(idx).logits, again(idx).logits)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
