"""The fused Expert Choice CPU kernels (finemoe.kernels.cpu_fused) against the unfused path and the slow
reference, and the layer's fallback when they cannot be built."""

import contextlib
import shutil

import pytest
import torch
from test_moe import _assert_matches_reference, _cfg, _grads
from torch.utils._python_dispatch import TorchDispatchMode

from finemoe.benchmarks.op_times import op_kind
from finemoe.kernels import cpu_fused as cpu_kernels
from finemoe.nn.moe import MoE


def _can_build() -> bool:
    return torch.backends.mkl.is_available() and any(shutil.which(c) for c in ("c++", "g++"))


@pytest.fixture
def kernels():
    if not _can_build():
        pytest.skip("needs a C++ compiler and a torch with MKL")
    assert cpu_kernels.available()
    return torch.ops.finemoe_cpu


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def fresh_availability():
    """available() decided again in the test, and again after it (the kernels load back)."""
    cpu_kernels.available.cache_clear()
    yield
    cpu_kernels.available.cache_clear()


def test_kernels_build_where_a_compiler_is():
    """No silent fallback on the machines this project supports (CI included)."""
    if not _can_build():
        pytest.skip("no C++ compiler or no MKL: the unfused path is expected")
    assert cpu_kernels.available()


def test_a_builder_killed_mid_build_does_not_hang_later_processes(kernels, tmp_path):
    """torch's build lock is a plain file; a builder killed while holding it left every later process
    waiting on it forever."""
    import subprocess
    import sys

    stale = cpu_kernels.build_folder() / "lock"
    stale.touch()
    probe = "from finemoe.kernels import cpu_fused; print(cpu_fused.available())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    assert not stale.exists()


def _count_fused(monkeypatch) -> list[int]:
    calls = [0]
    apply = cpu_kernels.FusedExpertChoice.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(cpu_kernels.FusedExpertChoice, "apply", counted)
    return calls


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("E,G,B", [(4, 2, 6), (3, 4, 6), (2, 8, 4)])
def test_fused_layer_matches_reference_and_unfused(kernels, monkeypatch, threads, E, G, B):
    torch.manual_seed(E * 10 + G)
    m = MoE(_cfg(expansion_rate=E, granularity=G))
    x, r = torch.randn(B, 5, 16), torch.randn(B, 5, 16)
    calls = _count_fused(monkeypatch)
    with _threads(threads):
        _assert_matches_reference(m, x, r)
        assert calls[0] == 1  # the layer ran through the kernels
        y, g = _grads(m, x, lambda v: m(v)[0], r)
        m.experts.use_cpu_kernels = False
        y0, g0 = _grads(m, x, lambda v: m(v)[0], r)
    assert calls[0] == 2  # and not when switched off
    torch.testing.assert_close(y, y0, atol=1e-6, rtol=1e-5)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _expected(x, idx, gates, w1, w2, dout):
    """The same products by autograd: h, dxs (per slot), dw1, dw2, dgates."""
    x = x.detach().requires_grad_(True)
    xs = x[idx].detach().requires_grad_(True)
    w1, w2, gates = (t.detach().requires_grad_(True) for t in (w1, w2, gates))
    h = torch.relu(torch.bmm(xs, w1))
    y = torch.bmm(h, w2) * gates[..., None]
    (y * dout[idx]).sum().backward()
    return h.detach(), xs.grad, w1.grad, w2.grad, gates.grad


@pytest.mark.parametrize("block", [0, 3, 4, 10])  # blocks of slots per tile: auto, ragged, even, whole
def test_kernels_equal_autograd_for_any_block(kernels, block):
    torch.manual_seed(block)
    N, n, C, d, w = 20, 6, 10, 8, 4
    x, dout = torch.randn(N, d), torch.randn(N, d)
    idx = torch.randint(0, N, (n, C))
    gates = torch.rand(n, C)
    gates[1, 3] = 0.0  # an exactly-zero gate gets gradient 0, as on the unfused path
    w1, w2 = torch.randn(n, d, w), torch.randn(n, w, d)
    h, dxs, dw1, dw2, dg = _expected(x, idx, gates, w1, w2, dout)
    dg[1, 3] = 0.0
    torch.testing.assert_close(kernels.gather_mm(x, idx, w1, block).relu(), h)
    got = kernels.expert_backward(x, idx, gates, w1, w2, h, dout, block)
    for a, b in zip(got, (dxs, dw1, dw2, dg)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_kernels_reject_bad_input_in_one_line(kernels):
    x, w = torch.randn(10, 4), torch.randn(1, 4, 3)
    with pytest.raises(RuntimeError, match=r"token ids must lie in \[0, 10\)"):
        kernels.gather_mm(x, torch.tensor([[0, 10]]), w)
    with pytest.raises(RuntimeError, match="contiguous 2-d CPU tensor of Float"):
        kernels.gather_mm(x.double(), torch.tensor([[0, 1]]), w)


def test_no_slots_gives_zero_weight_gradients(kernels):
    x, dout = torch.randn(5, 4), torch.randn(5, 4)
    idx, gates = torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0)
    w1, w2 = torch.randn(3, 4, 2), torch.randn(3, 2, 4)
    h = kernels.gather_mm(x, idx, w1)
    dxs, dw1, dw2, dg = kernels.expert_backward(x, idx, gates, w1, w2, h, dout)
    assert h.shape == (3, 0, 2) and dxs.shape == (3, 0, 4) and dg.shape == (3, 0)
    assert not dw1.any() and not dw2.any()


def test_applies_to_fp32_cpu_with_enough_experts_only(kernels):
    x, w = torch.randn(4, 8), torch.randn(16, 8, 2)
    with _threads(2):
        assert cpu_kernels.applies(x, w, 8)
        assert not cpu_kernels.applies(x, w, 7)  # fewer than 4 experts a thread: bmm threads better
        assert not cpu_kernels.applies(x.bfloat16(), w.bfloat16(), 16)


def test_gelu_experts_keep_the_unfused_path(kernels, monkeypatch):
    calls = _count_fused(monkeypatch)
    m = MoE(_cfg(expansion_rate=4, granularity=4, activation="gelu"))
    m(torch.randn(8, 5, 16))
    assert calls[0] == 0


def test_failed_build_warns_once_and_the_layer_still_works(monkeypatch, fresh_availability):
    def no_compiler():
        raise RuntimeError("Error building extension 'finemoe_cpu_kernels': c++: not found\nmore")

    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    calls = _count_fused(monkeypatch)
    with pytest.warns(UserWarning, match=r"unavailable \(Error building extension .*not found\)") as rec:
        assert not cpu_kernels.available()
    assert not cpu_kernels.available() and len(rec) == 1  # decided once per process
    torch.manual_seed(0)
    m = MoE(_cfg(expansion_rate=4, granularity=4))
    with _threads(1):
        _assert_matches_reference(m, torch.randn(6, 5, 16), torch.randn(6, 5, 16))
    assert calls[0] == 0


def test_environment_switch_turns_them_off_without_a_build(monkeypatch, fresh_availability):
    def must_not_build():
        raise AssertionError("built although switched off")

    monkeypatch.setattr(cpu_kernels, "_build", must_not_build)
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert not cpu_kernels.available()


def test_breakdown_sees_the_fused_ops_as_expert_matmuls(kernels):
    """Registered as CPU kernels, not composite ones: the op timer's dispatch mode sees them."""
    assert op_kind(kernels.gather_mm.default) == "expert matmuls"
    assert op_kind(kernels.expert_backward.default) == "expert matmuls"
    seen = set()

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m = MoE(_cfg(expansion_rate=4, granularity=4))
    x = torch.randn(6, 5, 16, requires_grad=True)
    with _threads(1), Names():
        m(x)[0].sum().backward()
    assert {"gather_mm", "expert_backward"} <= seen
