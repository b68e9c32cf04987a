"""The op-kind split behind `finemoe bench moe-layer --breakdown`."""

import pytest
import torch
import torch.nn.functional as F

from finemoe.benchmarks.op_times import KINDS, OpTimer, op_kind, step_breakdown

aten = torch.ops.aten


@pytest.mark.parametrize(
    "func, args, kind",
    [
        (aten.bmm.default, (), "expert matmuls"),
        (aten._grouped_mm.default, (), "expert matmuls"),
        (aten.mm.default, (), "other matmuls"),
        (aten.addmm.default, (), "other matmuls"),
        (aten.convolution.default, (None, None, None, [1], [0], [1], False, [0], 4), "expert matmuls"),
        (aten.convolution.default, (None, None, None, [1], [0], [1], False, [0], 1), "other matmuls"),
        (aten.index_select.default, (), "gather/combine"),
        (aten._embedding_bag.default, (), "gather/combine"),
        (aten.relu.default, (), "other ops"),
        (aten.native_layer_norm.default, (), "other ops"),
    ],
)
def test_op_kind(func, args, kind):
    assert op_kind(func, args, {}) == kind


def test_backward_ops_are_timed():
    """Ops the autograd engine runs count too: a timer around backward() alone sees its bmms."""
    x = torch.randn(4, 32, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    y = torch.bmm(x, w)
    timer = OpTimer()
    with timer:
        y.sum().backward()
    assert timer.seconds["expert matmuls"] > 0 and "gather/combine" not in timer.seconds
    assert x.grad is not None and w.grad is not None


def test_step_breakdown_kinds_and_results():
    x = torch.randn(64, 32)
    idx = torch.randint(0, 64, (256,))
    got = {}

    def step():
        got["y"] = F.relu(x.index_select(0, idx) @ torch.ones(32, 8))

    split = step_breakdown(step)
    assert list(split) == list(KINDS) and all(v >= 0 for v in split.values())
    assert split["other matmuls"] > 0 and split["gather/combine"] > 0 and split["other ops"] > 0
    assert split["expert matmuls"] == 0
    assert torch.equal(got["y"], F.relu(x[idx] @ torch.ones(32, 8)))  # timing leaves results alone
