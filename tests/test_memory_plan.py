"""The memory model of `finemoe plan --devices` against what tiny CPU models hold, its scaling under FSDP
and expert parallelism, and the layout it proposes (docs/memory.md)."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from finemoe import accounting as acc
from finemoe.cli import main
from finemoe.config import ModelConfig
from finemoe.nn.experts import Experts
from finemoe.nn.model import Transformer
from finemoe.scaling import memory as M

DENSE = ModelConfig(vocab_size=256, seq_len=32, d_model=64, n_blocks=2, n_heads=4, ffn="dense")
DENSE_GELU_ROPE = DENSE.replace(activation="gelu", pos_emb="rope", n_blocks=1)
EC = ModelConfig(vocab_size=128, seq_len=16, d_model=32, n_blocks=2, expansion_rate=4, granularity=2)
EC_WIDE = ModelConfig(vocab_size=256, seq_len=64, d_model=64, n_blocks=1, expansion_rate=8, granularity=4)
TC = EC.replace(routing="tc")
TC_MIXED = EC_WIDE.replace(routing="tc", n_blocks=2, moe_every=2)

CASES = [  # (config, sequences per forward)
    (DENSE, 2),
    (DENSE_GELU_ROPE, 2),
    (EC, 8),
    (EC, 2),  # groups too small for Expert Choice: the layer routes by token
    (EC_WIDE, 16),
    (TC, 8),
    (TC_MIXED, 4),
]


def _ids(case):
    cfg, batch = case
    return f"{cfg.ffn}-{cfg.routing if cfg.ffn == 'moe' else cfg.activation}-d{cfg.d_model}-b{batch}"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors_on(obj) -> list[torch.Tensor]:
    """Tensors a custom autograd Function keeps on its context (the kernels' Dispatch maps)."""
    out = []
    for v in getattr(obj, "__dict__", {}).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif hasattr(v, "__dict__") and not isinstance(v, type):
            out += [t for t in vars(v).values() if isinstance(t, torch.Tensor)]
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under a DTensor (a rank's shard) or an all_to_all's pending result."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.elem if hasattr(t, "elem") else t


def measured_activations(model: Transformer, batch: int, bf16: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward (saved tensors and
    tensors held on custom Functions' contexts), plus the logits; weights and buffers excluded."""
    cfg = model.cfg
    skip = {_local(t).untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def record(t: torch.Tensor) -> torch.Tensor:
        s = _local(t).untyped_storage()
        if s.data_ptr() not in skip:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(idx, targets)
    stack, done = [out.loss.grad_fn, *(v.grad_fn for v in out.aux.values())], set()
    while stack:
        node = stack.pop()
        if node is None or node in done:
            continue
        done.add(node)
        for t in _tensors_on(node):
            record(t)
        stack += [f for f, _ in node.next_functions]
    record(out.logits)
    return sum(seen.values())


def _model(cfg: ModelConfig) -> Transformer:
    """The model in training mode on the path CUDA runs: the CPU's fused Expert Choice kernels, which
    regather tokens in backward instead of keeping them, are off."""
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    for m in model.modules():
        if isinstance(m, Experts):
            m.use_cpu_kernels = False
    return model


@pytest.mark.filterwarnings("ignore:expert choice group")
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_within_20_percent_of_measured(case, precision):
    cfg, batch = case
    measured = measured_activations(_model(cfg), batch, bf16=precision == "bf16")
    estimate = M.activation_bytes(cfg, batch, precision)["total"]
    assert estimate == pytest.approx(measured, rel=0.2)
    if cfg.routing == "ec" or cfg.ffn == "dense":  # fixed shapes: the model is exact to the loss's 4 bytes
        assert estimate == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("cfg", [DENSE, DENSE_GELU_ROPE, EC, TC_MIXED.replace(moe_out_norm=False)])
def test_weights_gradients_optimizer_exact_after_one_adamw_step(cfg):
    model = _model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.seq_len))
    model(idx, idx).loss.backward()
    opt.step()
    est = M.memory_per_device(cfg, M.Layout(1), micro_batch=8, precision="fp32")
    assert est["weights"] == _nbytes([*model.parameters(), *model.buffers()])
    assert est["gradients"] == _nbytes(p.grad for p in model.parameters())
    assert est["optimizer"] == _nbytes(t for s in opt.state.values() for t in s.values())
    assert M.param_counts(cfg).total == acc.exact_params(cfg)["total"]
    assert est["total"] == sum(est[k] for k in M.PART_KEYS)


@pytest.fixture
def gloo_world_of_one():
    import torch.distributed as dist

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_expert_parallel_kernel_activations(gloo_world_of_one, precision):
    """The expert-parallel kernel's saved tensors, measured in a world of one (ep=1, all experts local)."""
    from finemoe.parallel import expert_parallel

    model = _model(EC)
    expert_parallel.shard_experts(model, expert_parallel.mesh_for(1, 1, torch.device("cpu")))
    measured = measured_activations(model, 8, bf16=precision == "bf16")
    estimate = M.activation_bytes(EC, 8, precision, expert_parallel=True)["total"]
    assert estimate == pytest.approx(measured, rel=0.01)
    assert estimate > M.activation_bytes(EC, 8, precision)["total"]  # returned and gated copies per slot


# --- scaling over devices -------------------------------------------------------------------------------

BIG = ModelConfig(vocab_size=32768, seq_len=1024, d_model=1024, n_blocks=8, expansion_rate=64, granularity=8)


@pytest.mark.parametrize("devices", [2, 4, 8, 64])
def test_fsdp_shards_state_as_one_over_devices(devices):
    one = M.memory_per_device(BIG, M.Layout(1))
    many = M.memory_per_device(BIG, M.Layout(devices, fsdp=True))
    buffers = M.param_counts(BIG).buffer_bytes
    assert many["weights"] - buffers == pytest.approx((one["weights"] - buffers) / devices, rel=1e-9)
    assert many["gradients"] == pytest.approx(one["gradients"] / devices, rel=1e-9)
    steps = 4 * M.param_counts(BIG).tensors
    assert many["optimizer"] - steps == pytest.approx((one["optimizer"] - steps) / devices, rel=1e-9)
    assert many["activations"] == one["activations"]  # each rank runs its own micro-batch


@pytest.mark.parametrize("ep", [2, 4, 8])
def test_expert_parallel_splits_only_the_experts(ep):
    c = M.param_counts(BIG)
    ddp = M.memory_per_device(BIG, M.Layout(8))
    sharded = M.memory_per_device(BIG, M.Layout(8, ep=ep))
    assert ddp["weights"] - sharded["weights"] == 4 * (c.experts - c.experts // ep)
    assert ddp["optimizer"] - sharded["optimizer"] == 8 * (c.experts - c.experts // ep)
    assert sharded["buffers"] < ddp["buffers"]  # DDP's gradient buckets leave the experts out
    assert M.Layout(8, ep=ep).parallel == {"ep": ep} and M.Layout(8, ep=ep).dp == 8 // ep


def test_fsdp_with_expert_parallelism_gathers_only_its_share_of_the_experts():
    both, fsdp = M.Layout(8, fsdp=True, ep=4), M.Layout(8, fsdp=True)
    assert both.parallel == {"fsdp": True, "ep": 4} and both.dp == 2 and both.name == "FSDP x8 with EP 4"
    a, b = M.memory_per_device(BIG, both), M.memory_per_device(BIG, fsdp)
    for k in ("weights", "gradients", "optimizer"):  # the same 1/devices of the state
        assert a[k] == b[k]
    d, n = BIG.d_model, BIG.n_experts  # one MoE block's experts: two [n, d, d_ff/G] matrices
    experts = 2 * n * d * BIG.expert_width
    assert b["buffers"] - a["buffers"] == 4 * 3 * (experts - experts // 4)  # 3 blocks' weights, fp32
    # every other block dense: the largest gathered block may be a dense one
    mixed = BIG.replace(moe_every=2, expansion_rate=1, granularity=8)
    kinds = M.param_counts(mixed).block_kinds
    assert len(kinds) == 2 and {e > 0 for _, e in kinds} == {True, False}
    dense_block = max(p for p, e in kinds if e == 0)
    gathered = M.memory_per_device(mixed, M.Layout(8, fsdp=True, ep=8))["buffers"]
    assert gathered >= 4 * 3 * dense_block
    assert "parallel.fsdp=true parallel.ep=4" in M.torchrun_command(both, 1)


def test_bad_layouts_refused():
    with pytest.raises(ValueError, match="divisor"):
        M.Layout(8, ep=3)
    with pytest.raises(ValueError, match="divide"):
        M.memory_per_device(BIG.replace(expansion_rate=3, granularity=2), M.Layout(4, ep=4))
    with pytest.raises(ValueError, match="devices"):
        M.best_layout(BIG, 0, 80e9)
    with pytest.raises(ValueError, match="memory"):
        M.best_layout(BIG, 8, 0)


# --- layout choice --------------------------------------------------------------------------------------


def test_ddp_when_a_replica_fits():
    lay = M.best_layout(EC, 4, 1e9, micro_batch=8, precision="fp32")
    assert lay["fits"] and lay["parallel"] == {} and not lay["fsdp"] and lay["ep"] == 1 and lay["dp"] == 4
    assert "reason" not in lay and lay["bytes_per_device"]["total"] <= lay["usable_memory"]
    assert "--nproc_per_node 4" in lay["command"] and "micro_batch_size=8" in lay["command"]
    assert "model.ec_group_size=8" in lay["command"]  # the trainer runs Expert Choice micro-batches so


def test_sharding_proposed_when_only_sharding_fits():
    tried = {t["name"]: t["bytes_per_device"]["total"] for t in M.best_layout(BIG, 8, 1e15)["tried"]}
    assert list(tried) == [
        "DDP x8",
        "EP 2 x DP 4",
        "EP 4 x DP 2",
        "EP 8 x DP 1",
        "FSDP x8",
        "FSDP x8 with EP 2",
        "FSDP x8 with EP 4",
        "FSDP x8 with EP 8",
    ]
    budget = (tried["EP 4 x DP 2"] + tried["EP 2 x DP 4"]) / 2 / 0.9  # EP 4 fits, EP 2 and DDP do not
    lay = M.best_layout(BIG, 8, budget)
    assert lay["fits"] and lay["ep"] == 4 and lay["parallel"] == {"ep": 4} and lay["dp"] == 2
    assert "parallel.ep=4" in lay["command"]
    dense = BIG.replace(ffn="dense")  # no experts to split: FSDP is what shards
    totals = {t["name"]: t["bytes_per_device"]["total"] for t in M.best_layout(dense, 8, 1e15)["tried"]}
    lay = M.best_layout(dense, 8, (totals["FSDP x8"] + totals["DDP x8"]) / 2 / 0.9)
    assert lay["fits"] and lay["fsdp"] and lay["parallel"] == {"fsdp": True}


def test_nothing_fits_says_why():
    lay = M.best_layout(BIG, 8, 10e9)
    assert lay["fits"] is False and lay["parallel"] is None and lay["command"] is None
    assert "no layout fits on 8 devices" in lay["reason"] and "16 fit: EP 16 x DP 1" in lay["reason"]
    assert M.best_layout(BIG, 16, 10e9)["ep"] == 16
    tiny = M.best_layout(BIG, 8, 1e6, micro_batch=4)  # activations alone are over any share
    assert "no device count fits" in tiny["reason"] and "micro-batch of 1" in tiny["reason"]


def test_bf16_keeps_a_copy_of_the_matmul_weights():
    """bf16 autocast keeps a bf16 copy of every matmul weight for backward; fp32 keeps none."""
    c = M.param_counts(EC)
    bf16 = M.activation_bytes(EC, 8, "bf16")["weight_copies"]
    assert bf16 == 2 * (c.cast + c.experts) and M.activation_bytes(EC, 8, "fp32")["weight_copies"] == 0


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_json_layout(capsys):
    argv = ["plan", "--flops", "1e19", "--devices", "8", "--device-memory", "80GB", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    lay = out["layout"]
    keys = {
        "fits",
        "devices",
        "fsdp",
        "ep",
        "dp",
        "micro_batch",
        "bytes_per_device",
        "device_memory",
        "parallel",
    }
    assert keys <= set(lay)
    assert set(lay["bytes_per_device"]) == {*M.PART_KEYS, "total"}
    assert lay["fits"] and lay["devices"] == 8 and lay["device_memory"] == 80e9 and lay["micro_batch"] == 1
    assert lay["ep"] * lay["dp"] == 8
    assert main(argv[:-5] + ["--json"]) == 0  # without --devices: the plan as before, no layout
    plain = json.loads(capsys.readouterr().out)
    assert "layout" not in plain and set(out) - set(plain) == {"layout"}


def test_cli_human_memory_table(capsys):
    argv = ["plan", "--flops", "1e19", "--devices", "8", "--device-memory", "80e9", "--precision", "fp32"]
    assert main(argv + ["--micro-batch", "2", "--seq-len", "512"]) == 0
    text = capsys.readouterr().out
    assert "memory per device in GB" in text and "micro-batch 2 x 512 tokens" in text
    assert "proposed layout (<):" in text and "parallel: {" in text and "torch.distributed.run" in text


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "finemoe", *argv], capture_output=True, text=True)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--devices", "0", "--device-memory", "80e9"], "--devices: expected a positive integer"),
        (["--devices", "8", "--device-memory", "0"], "--device-memory: expected a positive size"),
        (["--devices", "8", "--device-memory", "lots"], "--device-memory: expected a positive size"),
        (["--devices", "8"], "--devices needs --device-memory"),
        (["--micro-batch", "2"], "apply only with --devices"),
        (["--devices", "8", "--device-memory", "80e9", "--micro-batch", "0"], "--micro-batch"),
    ],
)
def test_cli_bad_memory_input_one_line_exit_2(argv, msg):
    r = _cli("plan", "--flops", "1e20", *argv)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert msg in r.stderr


@pytest.mark.parametrize(
    "text, want", [("80e9", 80e9), ("80GB", 80e9), ("80 GiB", 80 * 2**30), ("1.5T", 1.5e12)]
)
def test_byte_sizes(text, want):
    from finemoe.commands.plan import byte_size

    assert byte_size(text) == pytest.approx(want)
