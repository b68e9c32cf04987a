"""Every fast path of the experts against `Experts.reference`: outputs and all gradients.

Each case takes a different path through `fast_path` (asserted by spying on what it ran): the fused
CPU kernels, the unfused batched matmuls, a non-ReLU activation, the oneDNN convolutions, Token
Choice's padded buckets, its grouped GEMM, its buckets one by one under oneDNN, and bf16 autocast.
"""

import pytest
import torch

from finemoe.config import ModelConfig
from finemoe.kernels import cpu_fused, paths
from finemoe.kernels.cpu_matmul import cpu_matmul
from finemoe.nn import experts as X
from finemoe.nn.routing import expert_choice, token_choice

CASES = {  # name: (routing, model overrides, experts attributes, cpu matmul, autocast, the path it must take)
    "ec-fused": ("ec", {}, {}, "mkl", False, "fused"),
    "ec-unfused": ("ec", {}, {"use_cpu_kernels": False}, "mkl", False, "BatchedMM"),
    "ec-gelu": ("ec", {"activation": "gelu"}, {}, "mkl", False, "BatchedMM"),
    "ec-onednn": ("ec", {}, {}, "onednn", False, "ConvMM"),
    "tc-buckets": ("tc", {}, {}, "mkl", False, "BucketsMM"),
    "tc-grouped": ("tc", {}, {"use_grouped_mm": True}, "mkl", False, "GroupedMM"),
    "tc-onednn-buckets": ("tc", {}, {}, "onednn", False, "ConvMM"),
    "ec-bf16": ("ec", {}, {}, "mkl", True, "BatchedMM"),
}


def _slots(routing, probs, B, T, cfg):
    if routing == "ec":
        return expert_choice(probs.view(B, T, -1), 2)
    slots, _ = token_choice(probs.view(B * T, -1), cfg.granularity)
    return slots


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_matches_the_reference(name, monkeypatch):
    routing, over, attrs, matmul, bf16, path = CASES[name]
    if matmul == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    if path == "fused" and not cpu_fused.available():
        pytest.skip("no C++ compiler here: the fused kernels cannot build")
    cfg = ModelConfig(d_model=32, expansion_rate=4, granularity=4, seq_len=8, **over)
    torch.manual_seed(0)
    m = X.Experts(cfg)
    for k, v in attrs.items():
        setattr(m, k, v)
    B, T, d = 8, 6, cfg.d_model
    x = torch.randn(B * T, d)
    logits = torch.randn(B * T, cfg.n_experts)

    taken = []
    for cls in ("BatchedMM", "ConvMM", "BucketsMM", "GroupedMM"):
        orig = getattr(paths, cls)
        monkeypatch.setattr(paths, cls, lambda *a, _o=orig, _n=cls, **k: taken.append(_n) or _o(*a, **k))
    fused = cpu_fused.FusedExpertChoice.apply
    monkeypatch.setattr(cpu_fused.FusedExpertChoice, "apply", lambda *a: taken.append("fused") or fused(*a))

    def run(fn):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        li = logits.clone().requires_grad_(True)
        slots = _slots(routing, li.softmax(-1), B, T, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fn(xi, slots)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach().float(), [xi.grad, li.grad, m.w1.grad, m.w2.grad]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # oneDNN needs two threads; the fused kernels 4 experts a thread
    try:
        with cpu_matmul(matmul):
            y, grads = run(m)
            assert path in taken, f"{name} took {taken}, not {path}"
            ref_y, ref_grads = run(m.reference)
    finally:
        torch.set_num_threads(threads)
    tol = dict(atol=3e-2, rtol=3e-2) if bf16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y, ref_y, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_the_seam_takes_any_kernel():
    cfg = ModelConfig(d_model=16, expansion_rate=2, granularity=2, seq_len=4)
    m = X.Experts(cfg)
    x = torch.randn(8, 16)
    slots = expert_choice(torch.rand(2, 4, cfg.n_experts).softmax(-1), 1)
    m.kernel = lambda experts, xs, s: experts.reference(xs, s) * 0 + 7
    assert torch.equal(m(x, slots), torch.full_like(x, 7))


def test_padded_slots_put_padding_on_token_zero_with_gate_zero():
    slots, _ = token_choice(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]), 1)
    idx, gates = X.padded_slots(slots, 3)
    assert idx.tolist() == [[0, 1], [0, 0], [2, 0]]
    assert gates.flatten().tolist() == pytest.approx([0.7, 0.6, 0.0, 0.0, 0.8, 0.0])
