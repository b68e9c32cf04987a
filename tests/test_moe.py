"""The MoE layer against a slow loop-over-experts reference, a dense FFN, and its routing contracts."""

import pytest
import torch
import torch.nn.functional as F

from finemoe.config import ModelConfig
from finemoe.nn.model import DenseFFN
from finemoe.nn.moe import MoE, batch_routing
from finemoe.nn.routing import ec_tokens_per_expert, expert_choice, token_choice

ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def _cfg(**kw):
    base = dict(d_model=16, expansion_rate=2, granularity=2, seq_len=8)
    base.update(kw)
    return ModelConfig(**base)


def reference_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct loop over groups, experts and tokens (same routing rules as MoE)."""
    cfg = m.cfg
    B, T, d = x.shape
    n = cfg.n_experts
    probs = (x.reshape(-1, d) @ m.router.weight.t()).softmax(-1).view(B, T, n)
    w1, w2, act = m.experts.w1, m.experts.w2, ACT[cfg.activation]
    contrib = {(b, t): [] for b in range(B) for t in range(T)}
    k = ec_tokens_per_expert(B, cfg.expansion_rate, cfg.capacity_factor) if cfg.routing == "ec" else None
    if k is not None:
        for t in range(T):
            for e in range(n):
                vals, bs = probs[:, t, e].topk(k)
                for v, b in zip(vals, bs.tolist()):
                    contrib[b, t].append(v * (act(x[b, t] @ w1[e]) @ w2[e]))
    else:
        top = cfg.k_tokens_choice if cfg.routing == "tc" else m.small_group_top_k()
        for b in range(B):
            for t in range(T):
                vals, es = probs[b, t].topk(top)
                for v, e in zip(vals, es.tolist()):
                    contrib[b, t].append(v * (act(x[b, t] @ w1[e]) @ w2[e]))
    out = torch.stack(
        [
            torch.stack(c).sum(0) if c else x.new_zeros(d)
            for c in (contrib[b, t] for b in range(B) for t in range(T))
        ]
    ).view(B, T, d)
    return m.ln(out)


def _grads(m, x, fn, r):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * r).sum().backward()
    return y.detach(), [x.grad] + [p.grad.clone() for p in m.parameters()]


def _assert_matches_reference(m, x, r):
    """The layer's output and every gradient equal the slow reference's."""
    ref_y, ref_g = _grads(m, x, lambda v: reference_moe(m, v), r)
    y, g = _grads(m, x, lambda v: m(v)[0], r)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


CASES = [  # (routing, E, G, B, extra)
    ("ec", 1, 1, 4, {}),
    ("ec", 2, 2, 6, {}),
    ("ec", 3, 4, 6, {}),
    ("ec", 4, 2, 6, {}),  # k = round(1.5) = 2
    ("ec", 2, 4, 4, {"capacity_factor": 1.5, "activation": "gelu"}),
    ("ec", 4, 2, 2, {}),  # group too small: token-choice fallback
    ("tc", 1, 1, 3, {}),
    ("tc", 2, 2, 3, {}),
    ("tc", 3, 4, 2, {}),
    ("tc", 2, 4, 2, {"top_k": 3, "activation": "silu"}),
]


@pytest.mark.filterwarnings("ignore:expert choice group")  # the small-group case warns by design
@pytest.mark.parametrize("routing,E,G,B,extra", CASES)
def test_matches_reference_outputs_and_grads(routing, E, G, B, extra):
    torch.manual_seed(E * 10 + G + B)
    m = MoE(_cfg(routing=routing, expansion_rate=E, granularity=G, **extra))
    x = torch.randn(B, 5, 16)
    r = torch.randn(B, 5, 16)
    sorted_slots = routing == "tc" or ec_tokens_per_expert(B, E, m.cfg.capacity_factor) is None
    # padded bmm and grouped GEMM give the same answer; only expert-sorted slots read the switch
    for grouped in (False, True) if sorted_slots else (None,):
        m.experts.use_grouped_mm = grouped
        _assert_matches_reference(m, x, r)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])  # k <= 4: repeated max; above: topk
def test_expert_choice_takes_exactly_k_per_expert_per_group(k):
    torch.manual_seed(0)
    B, T, n = 8, 5, 6
    probs = torch.randn(B, T, n).softmax(-1)
    slots = expert_choice(probs, k)
    assert slots.idx.shape == (n, T * k)
    b, t = slots.idx // T, slots.idx % T
    for e in range(n):
        for pos in range(T):
            chosen = b[e][t[e] == pos]
            assert len(chosen) == k and len(set(chosen.tolist())) == k
            assert set(chosen.tolist()) == set(probs[:, pos, e].topk(k).indices.tolist())
    torch.testing.assert_close(slots.gates, probs.permute(2, 1, 0).reshape(n, -1).gather(1, t * B + b))


@pytest.mark.parametrize("k", [2, 6])
def test_expert_choice_tied_groups_still_give_exactly_k(k):
    """Identical tokens at one position (e.g. every sequence starts with BOS) tie exactly."""
    torch.manual_seed(0)
    B, T, n = 8, 4, 5
    probs = torch.randn(B, T, n).softmax(-1)
    probs[:, 0] = probs[0, 0]  # position 0: all B tokens tie for every expert
    probs[3, 2, 1] = float("nan")  # a diverged entry must not break the capacity
    slots = expert_choice(probs, k)
    b, t = slots.idx // T, slots.idx % T
    for e in range(n):
        for pos in range(T):
            chosen = b[e][t[e] == pos].tolist()
            assert len(chosen) == k and len(set(chosen)) == k
    assert 3 not in b[1][t[1] == 2].tolist()  # NaN ranks below every probability
    if k <= 4:  # the repeated-max path breaks ties to the lowest batch index
        assert sorted(b[0][t[0] == 0].tolist()) == list(range(k))


@pytest.mark.parametrize("B,T,n,k", [(8, 5, 6, 1), (8, 5, 6, 3), (8, 5, 6, 6), (130, 2, 3, 129)])
def test_expert_choice_token_major_listing_is_the_sorted_slots(B, T, n, k):
    """by_token (the combine's order, built without a sort) equals a stable sort of the slots by
    token; k = 129 needs a pick map wider than int8."""
    torch.manual_seed(0)
    probs = torch.randn(B, T, n).softmax(-1)
    slots = expert_choice(probs, k)
    tokens = slots.idx.reshape(-1)
    perm, offsets = slots.by_token
    counts = torch.bincount(tokens, minlength=B * T)
    assert torch.equal(perm, torch.argsort(tokens, stable=True))
    assert torch.equal(offsets, torch.cumsum(counts, 0) - counts)
    b, t = tokens.view(n, T * k) // T, tokens.view(n, T * k) % T
    for e in range(n):
        for pos in range(T):
            assert sorted(b[e][t[e] == pos].tolist()) == sorted(probs[:, pos, e].topk(k).indices.tolist())


def test_token_choice_gives_every_token_exactly_k_experts_no_drops():
    torch.manual_seed(0)
    N, n, k = 50, 8, 3
    probs = torch.randn(N, n).softmax(-1)
    slots, experts = token_choice(probs, k)
    assert slots.idx.numel() == N * k and int(slots.counts.sum()) == N * k
    assert torch.equal(torch.bincount(slots.idx, minlength=N), torch.full((N,), k))
    expert_of_slot = torch.repeat_interleave(torch.arange(n), slots.counts)
    for tok in range(N):
        mine = expert_of_slot[slots.idx == tok]
        assert sorted(mine.tolist()) == sorted(probs[tok].topk(k).indices.tolist())
    assert torch.equal(torch.bincount(experts.flatten(), minlength=n), slots.counts)


@pytest.mark.parametrize("routing", ["ec", "tc"])
def test_single_expert_equals_dense_ffn_plus_layernorm(routing):
    torch.manual_seed(0)
    cfg = _cfg(routing=routing, expansion_rate=1, granularity=1)
    moe, dense = MoE(cfg), DenseFFN(cfg.replace(ffn="dense", dense_bias=False))
    with torch.no_grad():
        dense.fc1.weight.copy_(moe.experts.w1[0].t())
        dense.fc2.weight.copy_(moe.experts.w2[0].t())
    x = torch.randn(4, 5, 16)
    y, aux = moe(x)
    torch.testing.assert_close(y, F.layer_norm(dense(x)[0], (16,)), atol=1e-5, rtol=1e-5)
    assert torch.equal(aux["load"], torch.ones(1))


def test_small_group_falls_back_to_token_choice_not_zeros():
    torch.manual_seed(0)
    m = MoE(_cfg(expansion_rate=4, granularity=2, moe_out_norm=False))
    assert ec_tokens_per_expert(1, 4, 1.0) is None and ec_tokens_per_expert(4, 4, 1.0) == 1
    x = torch.randn(1, 5, 16)
    m.eval()
    y, aux = m(x)
    assert (y.abs().sum(-1) > 0).all()  # every token got its top-G experts
    assert int((aux["load"] * 10).round().sum()) == 10  # 5 tokens x G=2 slots
    torch.testing.assert_close(y, reference_moe(m, x))
    m.train()
    with pytest.warns(UserWarning, match="top-2 experts"):
        import finemoe.nn.routing as routing

        routing._warned_small_group = False
        m(x)


def test_aux_losses_are_tensors_and_load_sums_to_one():
    torch.manual_seed(0)
    for routing in ("ec", "tc"):
        m = MoE(_cfg(routing=routing, expansion_rate=4))
        y, aux = m(torch.randn(8, 5, 16))
        for key in ("lb_loss", "z_loss"):
            assert aux[key].dim() == 0 and torch.isfinite(aux[key])
        assert aux["load"].shape == (8,) and not aux["load"].requires_grad
        torch.testing.assert_close(aux["load"].sum(), torch.tensor(1.0))
        assert aux["z_loss"].requires_grad
        if routing == "tc":
            assert 0.5 < aux["lb_loss"] < 2.0  # n * sum_e f_e P_e is 1 when balanced; near it at init
            aux["lb_loss"].backward()
            assert m.router.weight.grad.abs().sum() > 0


def test_router_stays_fp32_and_grads_finite_under_bf16_autocast():
    torch.manual_seed(0)
    for routing in ("ec", "tc"):
        m = MoE(_cfg(routing=routing, expansion_rate=4, granularity=2))
        x = torch.randn(8, 5, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.router(x).dtype == torch.float32
            y, aux = m(x)
            loss = y.float().square().mean() + aux["z_loss"] + aux["lb_loss"]
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        for p in m.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_init_std_follows_paper_fan_ins():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, expansion_rate=4, granularity=8)
    m = MoE(cfg)
    for w, fan_in in ((m.router.weight, 64), (m.experts.w1, 64), (m.experts.w2, cfg.d_ff)):
        assert abs(w.std().item() / (0.1 / fan_in) ** 0.5 - 1) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("routing", ["ec", "tc"])
def test_gpu_matches_cpu(routing):
    torch.manual_seed(0)
    m = MoE(_cfg(routing=routing, expansion_rate=4, granularity=2))
    x = torch.randn(8, 5, 16)
    y_cpu = m(x)[0]
    y_gpu = m.cuda()(x.cuda())[0]
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = m(x.cuda().requires_grad_(True))
        y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_token_choice_skewed_load_uses_overflow_batch_and_matches_reference():
    from finemoe.kernels.dispatch import pad_buckets

    torch.manual_seed(0)
    m = MoE(_cfg(routing="tc", expansion_rate=4, granularity=2))
    with torch.no_grad():
        m.router.weight[0] = 0.5  # expert 0 wins for every token with a positive mean
    x = torch.randn(4, 5, 16) + 1.0
    probs = m.router(x).softmax(-1).view(20, -1)
    slots, _ = token_choice(probs, 2)
    assert int(slots.counts[0]) == 20 and len(list(pad_buckets(slots).parts())) >= 2
    _assert_matches_reference(m, x, torch.randn(4, 5, 16))


def test_token_choice_with_idle_experts_matches_reference():
    """Experts that no token picks form an empty run: zero weight gradients, nothing else touched."""
    from finemoe.kernels.dispatch import pad_buckets

    torch.manual_seed(1)
    m = MoE(_cfg(routing="tc", expansion_rate=4, granularity=2))
    with torch.no_grad():
        m.router.weight[4:] = -5.0  # experts 4..7 lose to 0..3 for every token
        m.router.weight[4:, 0] = 0.0
    x = torch.randn(4, 5, 16).abs()
    probs = m.router(x).softmax(-1).view(20, -1)
    slots, _ = token_choice(probs, 2)
    runs = pad_buckets(slots)
    assert (slots.counts[4:] == 0).all() and 0 in runs.caps
    _assert_matches_reference(m, x, torch.randn(4, 5, 16))
    assert m.experts.w1.grad[4:].abs().sum() == 0 and m.experts.w2.grad[4:].abs().sum() == 0


def test_bucket_cuts_minimise_padded_slots():
    import itertools

    from finemoe.kernels.dispatch import bucket_cuts

    torch.manual_seed(0)
    for _ in range(20):
        c = sorted(torch.randint(0, 30, (7,)).tolist(), reverse=True)
        for k in (1, 2, 3):
            cuts = bucket_cuts(c, k)
            assert cuts[0] == 0 and cuts[-1] == len(c) and len(cuts) - 1 <= k

            def padded(cs, c=c):
                return sum((b - a) * c[a] for a, b in zip(cs[:-1], cs[1:]))

            brute = min(
                padded([0, *inner, len(c)])
                for m in range(k)
                for inner in itertools.combinations(range(1, len(c)), m)
            )
            assert padded(cuts) == brute


def _random_dispatch(n_tokens, n_slots, seed=0):
    from finemoe.kernels.dispatch import Dispatch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_tokens, (n_slots,), generator=g)
    return Dispatch.sorting(idx, n_tokens)


def _gated_output_reference(h, w2, gates, dispatch, offs):
    """The same sum through plain autograd: per-expert matmuls, gate, index_add."""
    if offs is None:
        y = torch.bmm(h, w2) * gates.unsqueeze(-1)
    else:
        ends = offs.tolist()
        starts = [0] + ends[:-1]
        y = torch.cat([h[s:e] @ w2[i] for i, (s, e) in enumerate(zip(starts, ends))]) * gates.unsqueeze(-1)
    y = y.reshape(-1, y.shape[-1])
    return torch.zeros(int(dispatch.offsets.numel()), y.shape[-1], dtype=y.dtype).index_add(
        0, dispatch.idx, y
    )


def test_gated_output_backward_matches_autograd_fixed_capacity():
    from finemoe.kernels.expert_mm import BatchedMM, GatedOutput

    torch.manual_seed(0)
    n, C, w, d, N = 3, 4, 5, 6, 7
    h = torch.randn(n, C, w, dtype=torch.double).relu().requires_grad_(True)
    w2 = torch.randn(n, w, d, dtype=torch.double, requires_grad=True)
    gates = torch.rand(n, C, dtype=torch.double, requires_grad=True)
    dispatch = _random_dispatch(N, n * C)
    args = (h, w2, gates)
    fn = lambda h, w2, g: GatedOutput.apply(h, w2, g, dispatch, BatchedMM())  # noqa: E731
    torch.testing.assert_close(fn(*args), _gated_output_reference(*args, dispatch, None))
    assert torch.autograd.gradcheck(fn, args)


def test_gated_output_grouped_matches_autograd():
    """The grouped-GEMM layout (rows sorted by expert); grouped_mm has no float64, so compared in
    float32 against the plain-autograd sum."""
    from finemoe.kernels.expert_mm import GatedOutput, GroupedMM

    torch.manual_seed(0)
    w, d, N = 8, 8, 7
    offs = torch.tensor([3, 3, 9, 12], dtype=torch.int32)  # an empty expert too
    h = torch.randn(12, w).relu().requires_grad_(True)
    w2 = torch.randn(4, w, d, requires_grad=True)
    gates = torch.rand(12, requires_grad=True)
    dispatch = _random_dispatch(N, 12)
    dout = torch.randn(N, d)
    got = torch.autograd.grad(
        GatedOutput.apply(h, w2, gates, dispatch, GroupedMM(offs)), (h, w2, gates), dout
    )
    ref = torch.autograd.grad(_gated_output_reference(h, w2, gates, dispatch, offs), (h, w2, gates), dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gated_output_zero_gate_gives_zero_not_nan():
    """An underflowed softmax gate (or a padding slot) of exactly 0: no NaN, and 0 is what the
    softmax backward would multiply that gate's gradient by anyway."""
    from finemoe.kernels.expert_mm import BatchedMM, GatedOutput

    torch.manual_seed(0)
    h = torch.randn(2, 3, 4).relu().requires_grad_(True)
    w2 = torch.randn(2, 4, 5, requires_grad=True)
    gates = torch.tensor([[0.5, 0.0, 0.2], [0.0, 1.0, 0.3]], requires_grad=True)
    dispatch = _random_dispatch(4, 6)
    out = GatedOutput.apply(h, w2, gates, dispatch, BatchedMM())
    torch.testing.assert_close(out, _gated_output_reference(h, w2, gates, dispatch, None))
    out.backward(torch.randn_like(out))
    assert torch.isfinite(gates.grad).all() and torch.isfinite(h.grad).all()
    assert gates.grad[0, 1] == 0 and gates.grad[1, 0] == 0 and (h.grad[0, 1] == 0).all()


def test_capacity_major_convolution_layout_matches_expert_major():
    """The oneDNN layout (slots [C, n], grouped 1x1 convolutions) computes the expert-major sum; in
    float64 (torch's non-oneDNN convolution) so gradcheck can check its backward too."""
    from finemoe.kernels.expert_mm import ConvMM, ExpertMM, GatedOutput

    torch.manual_seed(0)
    n, C, k, w, d, N = 3, 4, 6, 5, 6, 7
    dispatch = _random_dispatch(N, n * C)
    cm = dispatch.capacity_major(n, C)
    x = torch.randn(N, k, dtype=torch.double)
    xe = x[dispatch.idx].view(n, C, k)
    torch.testing.assert_close(x[cm.idx].view(C, n, k), xe.transpose(0, 1))  # the same slots, transposed
    w1 = torch.randn(n, k, w, dtype=torch.double, requires_grad=True)
    h = torch.bmm(xe, w1).relu()
    xc = xe.transpose(0, 1).reshape(C, n * k).requires_grad_(True)
    hc = ExpertMM.apply(xc, w1, ConvMM(n))
    torch.testing.assert_close(hc.view(C, n, w).transpose(0, 1), torch.bmm(xe, w1))
    assert torch.autograd.gradcheck(lambda a, b: ExpertMM.apply(a, b, ConvMM(n)), (xc, w1))

    h = h.detach().requires_grad_(True)
    w2 = torch.randn(n, w, d, dtype=torch.double, requires_grad=True)
    gates = torch.rand(n, C, dtype=torch.double, requires_grad=True)
    ref = _gated_output_reference(h, w2, gates, dispatch, None)
    hc = h.detach().transpose(0, 1).reshape(C, n * w).requires_grad_(True)
    fn = lambda hc, w2, g: GatedOutput.apply(hc, w2, g.t(), cm, ConvMM(n))  # noqa: E731
    torch.testing.assert_close(fn(hc, w2, gates), ref)
    assert torch.autograd.gradcheck(fn, (hc, w2, gates))


def test_in_place_relu_backward_matches_autograd():
    from finemoe.kernels.expert_mm import InplaceReLU

    torch.manual_seed(0)
    a = torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True)
    # in place on its input, as on a matmul's output in the layer: give it a non-leaf
    assert torch.autograd.gradcheck(lambda a: InplaceReLU.apply(a.clone()), (a,))


def test_z_loss_from_probs_matches_logsumexp_value_and_gradient():
    from finemoe.nn.routing import z_loss

    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 9, dtype=torch.double) * 30).requires_grad_(True)  # some probs underflow
    ref = torch.logsumexp(logits, -1).square().mean()
    (g_ref,) = torch.autograd.grad(ref, logits)
    fast = z_loss(logits, logits.softmax(-1))
    (g_fast,) = torch.autograd.grad(fast, logits)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(g_fast, g_ref)
    torch.testing.assert_close(z_loss(logits), ref)


def test_expert_choice_groups_of_fixed_size_route_each_group_alone():
    """ec_group_size=g: a batch routes as its blocks of g sequences would, one forward each, in
    outputs and gradients; so the result cannot depend on how ranks or micro-batches split the batch."""
    torch.manual_seed(0)
    grouped = MoE(_cfg(expansion_rate=2, granularity=2, ec_group_size=2))
    whole = MoE(_cfg(expansion_rate=2, granularity=2))
    whole.load_state_dict(grouped.state_dict())
    x = torch.randn(6, 5, 16, requires_grad=True)
    y, aux = grouped(x)
    parts = [whole(x[i : i + 2])[0] for i in range(0, 6, 2)]
    torch.testing.assert_close(y, torch.cat(parts))
    # the whole batch as one group routes differently: the grouping is real
    assert not torch.allclose(y, whole(x)[0])
    g1 = torch.autograd.grad(y.square().sum(), grouped.router.weight)[0]
    g2 = torch.autograd.grad(torch.cat(parts).square().sum(), whole.router.weight)[0]
    torch.testing.assert_close(g1, g2)
    with pytest.raises(ValueError, match="groups of 2"):
        grouped(torch.randn(3, 5, 16))
    grouped.eval(), whole.eval()
    with batch_routing(grouped), batch_routing(whole):  # evaluation of a batch of 3: one group of 3
        torch.testing.assert_close(grouped(x[:3])[0], whole(x[:3])[0])
