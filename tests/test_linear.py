"""The opt-in oneDNN path of finemoe.kernels.cpu_matmul: same values and gradients as F.linear, used only
where it applies, and selected per process (restored by the context, set by the trainer)."""

import pytest
import torch
import torch.nn.functional as F

from finemoe.config import ModelConfig
from finemoe.kernels import cpu_matmul as L
from finemoe.nn.model import Transformer


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def conv_calls(monkeypatch):
    """Counts the convolutions `linear` runs."""
    calls = []
    real = F.conv2d

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(L.F, "conv2d", spy)
    return calls


def _grads(fn, *leaves):
    out = fn()
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
    return [out.detach()] + [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear(shape, bias, two_threads, conv_calls):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(9, 12, requires_grad=True)
    b = torch.randn(9, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    ref = _grads(lambda: F.linear(x, w, b), *leaves)
    for t in leaves:
        t.grad = None
    with L.cpu_matmul("onednn"):
        got = _grads(lambda: L.linear(x, w, b), *leaves)
    assert len(conv_calls) == 1
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_conv_linear_is_a_grouped_linear_map():
    x = torch.randn(40, 12)
    w = torch.randn(6, 4)  # 3 groups of 2 outputs, each reading its own 4 columns
    ref = torch.cat([x[:, 4 * i : 4 * i + 4] @ w[2 * i : 2 * i + 2].t() for i in range(3)], dim=1)
    torch.testing.assert_close(L.conv_linear(x, w, groups=3), ref)
    w = torch.randn(5, 12)
    torch.testing.assert_close(L.conv_linear(x, w), x @ w.t())


def test_non_contiguous_input(two_threads, conv_calls):
    x = torch.randn(12, 6).t()  # [6, 12], column-major
    w = torch.randn(4, 12)
    with L.cpu_matmul("onednn"):
        torch.testing.assert_close(L.linear(x, w), x @ w.t())
    assert len(conv_calls) == 1


def test_falls_back_where_onednn_does_not_apply(conv_calls):
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    before = torch.get_num_threads()
    with L.cpu_matmul("onednn"):
        torch.set_num_threads(1)  # torch runs 1x1 convolutions on a slower kernel with one thread
        try:
            L.linear(x, w)
        finally:
            torch.set_num_threads(max(2, before))
        L.linear(x.double(), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert L.linear(x, w).dtype == torch.bfloat16
    torch.set_num_threads(before)
    L.linear(x, w)  # the default path
    assert conv_calls == []


def test_selection_is_validated_and_restored():
    assert L.get_cpu_matmul() == "mkl"
    with L.cpu_matmul("onednn"):
        assert L.get_cpu_matmul() == "onednn"
        with pytest.raises(ValueError, match="cpu_matmul must be one of"):
            L.set_cpu_matmul("openblas")
    assert L.get_cpu_matmul() == "mkl"


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_transformer_same_on_both_paths(ffn, two_threads, conv_calls):
    cfg = ModelConfig(
        vocab_size=50,
        seq_len=8,
        d_model=32,
        head_dim=16,
        n_blocks=2,
        ffn=ffn,
        granularity=2,
        expansion_rate=2,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 50, (4, 8))

    def run():
        model.zero_grad()
        logits = model(ids).logits
        logits.square().mean().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    ref = run()
    with L.cpu_matmul("onednn"):
        got = run()
    # qkv, proj per block and the head; then per block fc1, fc2 (dense) or the router and the two
    # expert matmuls forward and their input gradients backward (MoE)
    assert len(conv_calls) == 2 * 2 + 1 + (2 * 2 if ffn == "dense" else 2 * 5)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_trainer_runs_on_the_chosen_path_and_restores_it(tmp_path, conv_calls):
    from _train_fixtures import make_data, tiny_config

    from finemoe.errors import ConfigError
    from finemoe.train.config import TrainConfig
    from finemoe.train.trainer import train

    data = make_data(tmp_path / "data")
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=12, threads=2, cpu_matmul="onednn"))
    before = torch.get_num_threads()
    try:
        rec = train(cfg, quiet=True)
    finally:
        torch.set_num_threads(before)
    assert rec["status"] == "done" and len(conv_calls) > 0
    assert L.get_cpu_matmul() == "mkl"
    with pytest.raises(ConfigError, match="cpu_matmul must be one of"):
        TrainConfig.from_dict(tiny_config(data, tmp_path / "bad", cpu_matmul="blis"))


@pytest.mark.parametrize("routing", ["ec", "tc"])
@pytest.mark.parametrize("E,G", [(1, 1), (2, 4), (4, 2)])
def test_moe_layer_same_on_both_paths(routing, E, G, two_threads, conv_calls):
    """The experts' grouped convolutions (slots stored capacity-major) against the bmm path: output
    and every gradient, for Expert Choice and for Token Choice's padded buckets."""
    from finemoe.nn.moe import MoE

    cfg = ModelConfig(d_model=32, seq_len=8, expansion_rate=E, granularity=G, routing=routing)
    torch.manual_seed(0)
    layer = MoE(cfg)
    x = torch.randn(8, 8, 32, requires_grad=True)
    dy = torch.randn(8, 8, 32)

    def run():
        layer.zero_grad()
        x.grad = None
        y, _ = layer(x)
        y.backward(dy)
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    ref = run()
    with L.cpu_matmul("onednn"):
        got = run()
    assert len(conv_calls) >= 1 + 2 * 2  # router; two expert matmuls and their input gradients
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
