"""Memory per device for training a model with the trainer, and the smallest layout that fits.

Pure arithmetic on the model's dimensions (no torch), so `finemoe plan` can size a run before any
hardware is touched. docs/memory.md derives each term and says how it was checked.

Bytes per device (P_loc: the parameters a device holds; N = micro_batch * seq_len tokens):
  weights     = 4 P_loc + model buffers        fp32 master weights (also under bf16 autocast)
  gradients   = 4 P_loc                        fp32
  optimizer   = 8 P_loc + 4 n_tensors          AdamW exp_avg, exp_avg_sq, one fp32 step per tensor
  activations = what autograd keeps from forward to backward, plus the logits (below)
  buffers     = DDP gradient buckets (4 P_replicated), or FSDP's gathered units
                (4 (2 P_root + 3 P_block)), plus the logits' gradient at the start of backward (8 N V)
  P_loc = P (DDP), P - P_exp + P_exp / ep (EP), P / devices (FSDP)

Activations, with a = 2 (bf16) or 4 (fp32) bytes, d = d_model, H heads, w = expert width, V vocab,
S the routed slots of one MoE layer (Expert Choice: n_experts * k per routing group and position;
Token Choice: top_k per token), k_act = 1 for ReLU, 2 for GELU/SiLU:
  per block, per token:  attention a 5d + 4H (RoPE: + a 2d, + a 3d with several heads);
                         two LayerNorms 2 (4d + 8)
  dense FFN, per token:  a d + a k_act d_ff
  MoE, per token:        router 4d + 8 n_experts + 12; output LayerNorm a d + 8; slot map 8
  MoE, per slot:         a d + a k_act w (gathered token, hidden) + a (gate) + 24 (index and maps)
                         Token Choice: + 12 (bucket map, fp32 gate), and a copy of the experts'
                         weights, a bytes each
                         under EP instead: a 3d + a k_act w + a + 16 (Token Choice: + 16), no slot
                         map per token and no weight copy in fp32
  once per token:        ids 8 + targets 8 + final LayerNorm 4d + 8 + head input a d + logits (a + 4) V
  bf16 only:             2 bytes per matmul weight (autocast's copies: attention, dense FFN, experts,
                         head), and RoPE's cos and sin tables
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finemoe.config import ModelConfig
from finemoe.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
ACT_BYTES = {"fp32": 4, "bf16": 2}  # bytes per element of a matmul's activations
F32 = 4
INDEX = 8  # int64 token and slot ids
RESERVE = 0.10  # of device memory left for the CUDA context, NCCL and allocator fragmentation
PART_KEYS = ("weights", "gradients", "optimizer", "activations", "buffers")


@dataclass(frozen=True)
class Layout:
    """How a run spreads over `devices` ranks: DDP replicas (the default), FSDP2 shards of everything,
    expert parallelism over groups of `ep` ranks (the rest DDP), or both: the experts split over ep
    and then sharded over dp, the rest sharded over every rank."""

    devices: int
    fsdp: bool = False
    ep: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.devices, int) and self.devices >= 1):
            raise ConfigError(f"devices must be a whole number >= 1, got {self.devices!r}")
        if not (isinstance(self.ep, int) and self.ep >= 1 and self.devices % self.ep == 0):
            raise ConfigError(f"ep must be a divisor of devices={self.devices}, got {self.ep!r}")

    @property
    def dp(self) -> int:
        """The data-parallel dimension: every rank under DDP and FSDP, devices / ep with EP."""
        return self.devices // self.ep

    @property
    def parallel(self) -> dict[str, Any]:
        """The `parallel:` mapping of a training config for this layout."""
        return ({"fsdp": True} if self.fsdp else {}) | ({"ep": self.ep} if self.ep > 1 else {})

    @property
    def name(self) -> str:
        if self.fsdp:
            return f"FSDP x{self.devices}" + (f" with EP {self.ep}" if self.ep > 1 else "")
        if self.ep > 1:
            return f"EP {self.ep} x DP {self.dp}"
        return f"DDP x{self.devices}" if self.devices > 1 else "1 device"


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by what each layout does with them (see `param_counts`)."""

    total: int
    experts: int  # expert weights: what EP splits over its ranks
    cast: int  # non-expert matmul weights: autocast keeps a bf16 copy of each for backward
    root: int  # FSDP's root unit: embeddings, final norm, head
    block: int  # the largest block: one FSDP unit
    block_kinds: tuple[tuple[int, int], ...]  # (params, expert params) of each kind of block
    tensors: int  # parameter tensors: AdamW keeps one step counter for each
    buffer_bytes: int  # module buffers (RoPE tables, Expert Choice thresholds)


def model_config(model: Any, seq_len: int | None = None, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig for a config or a planned Architecture, as `plan --write-config` would write it
    (the model's other settings at their defaults); seq_len and vocab_size replace the config's."""
    changes = {k: v for k, v in (("seq_len", seq_len), ("vocab_size", vocab_size)) if v is not None}
    if isinstance(model, ModelConfig):
        return model.replace(**changes)
    return ModelConfig(
        d_model=model.d_model,
        n_blocks=model.n_blocks,
        head_dim=model.d_model // model.n_heads,
        ffn="moe",
        expansion_rate=model.n_experts // model.granularity,
        granularity=model.granularity,
        **changes,
    )


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int, int, int]:
    """(params, expert params, cast params, tensors) of one block."""
    d = cfg.d_model
    params, tensors, cast = 4 * d * d + 4 * d, 6, 4 * d * d  # attention and the two LayerNorms
    if moe:
        experts = 2 * cfg.n_experts * d * cfg.expert_width
        norm = 2 * d if cfg.moe_out_norm else 0
        return params + experts + d * cfg.n_experts + norm, experts, cast, tensors + 3 + (2 if norm else 0)
    bias = cfg.d_ff + d if cfg.dense_bias else 0
    return params + 2 * d * cfg.d_ff + bias, 0, cast + 2 * d * cfg.d_ff, tensors + (4 if bias else 2)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Every parameter tensor the model builds, grouped for the layouts; the total equals
    accounting.exact_params (tested)."""
    d, V, T = cfg.d_model, cfg.vocab_size, cfg.seq_len
    learned = cfg.pos_emb == "learned"
    root = V * d * 2 + (T * d if learned else 0) + (2 * d if cfg.final_norm else 0)
    total, experts, cast, block, kinds = root, 0, V * d, 0, set()
    tensors = 2 + (1 if learned else 0) + (2 if cfg.final_norm else 0)
    buffer_bytes = 0 if learned else 2 * T * ((cfg.d_model // cfg.heads + 1) // 2) * F32
    for i in range(cfg.n_blocks):
        moe = cfg.is_moe_block(i)
        p, e, c, t = _block_params(cfg, moe)
        total, experts, cast, tensors, block = total + p, experts + e, cast + c, tensors + t, max(block, p)
        kinds.add((p, e))
        if moe and cfg.routing == "ec":
            buffer_bytes += cfg.n_experts * F32 + INDEX  # thresholds and their batch count
    return ParamCounts(total, experts, cast, root, block, tuple(sorted(kinds)), tensors, buffer_bytes)


def ec_tokens_per_expert(group: int, expansion_rate: int, capacity_factor: float) -> int | None:
    """k of Expert Choice for a routing group of `group` sequences, None below one token (the layer
    then routes each token to its top experts); as finemoe.nn.routing computes it."""
    exact = capacity_factor * group / expansion_rate
    return None if exact < 1 else min(group, int(math.floor(exact + 0.5)))


def _ec_k(cfg: ModelConfig, micro_batch: int) -> tuple[int, int | None]:
    """(group, k) of Expert Choice in a forward of `micro_batch` sequences; k None: too small a group."""
    g = cfg.ec_group_size
    g = g if g is not None and g < micro_batch and micro_batch % g == 0 else micro_batch
    return g, ec_tokens_per_expert(g, cfg.expansion_rate, cfg.capacity_factor)


def routes_by_token(cfg: ModelConfig, micro_batch: int) -> bool:
    """Whether the MoE layers take the Token Choice path: routing tc, or Expert Choice groups too
    small for one token per expert (finemoe.nn.moe falls back to each token's top experts)."""
    return cfg.routing == "tc" or _ec_k(cfg, micro_batch)[1] is None


def slots_per_layer(cfg: ModelConfig, micro_batch: int) -> int:
    """Routed (token, expert) slots one MoE layer holds for a forward of `micro_batch` sequences."""
    T, n = cfg.seq_len, cfg.n_experts
    if cfg.routing == "ec":
        g, k = _ec_k(cfg, micro_batch)
        if k is not None:
            return n * (micro_batch // g) * T * k
        top = max(1, min(n, round(cfg.capacity_factor * cfg.granularity)))  # the small-group fallback
    else:
        top = cfg.k_tokens_choice
    return top * micro_batch * T


def _check(micro_batch: int, precision: str) -> None:
    if not (isinstance(micro_batch, int) and micro_batch >= 1):
        raise ConfigError(f"micro_batch must be a whole number of sequences >= 1, got {micro_batch!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _moe_bytes(cfg: ModelConfig, S: int, N: int, a: int, kernel_ep: bool, tc: bool) -> dict[str, int]:
    """One MoE layer's saved tensors: router, experts' hidden and gathered tokens, dispatch maps;
    `tc`: the Token Choice path."""
    d, w = cfg.d_model, cfg.expert_width
    k_act = 1 if cfg.activation == "relu" else 2
    router = N * (F32 * d + 2 * F32 * cfg.n_experts + 3 * F32)
    experts = S * a * (d + k_act * w)
    if kernel_ep:  # finemoe.parallel.expert_parallel: received, returned and gated outputs per slot
        experts += S * 2 * a * d
        dispatch = S * (2 * INDEX + a + (2 * INDEX if tc else 0))
    else:  # Dispatch maps held by the kernels' autograd contexts, gate index and gates saved
        dispatch = S * (3 * INDEX + a + (INDEX + F32 if tc else 0)) + N * INDEX
    norm = N * (a * d + 2 * F32) if cfg.moe_out_norm else 0
    return {"router": router, "ffn": experts, "dispatch": dispatch, "norms": norm}


def _weight_copies(counts: ParamCounts, precision: str, ep: int, kernel_ep: bool, tc: bool) -> int:
    """Copies of weights that autograd keeps: autocast's bf16 casts of the matmul weights, and Token
    Choice's expert weights permuted into load order (outside EP). Under FSDP the copies are of the
    gathered, whole weights."""
    a = ACT_BYTES[precision]
    local_experts = counts.experts // ep
    experts = a * local_experts if precision == "bf16" or (tc and not kernel_ep) else 0
    return experts + (2 * counts.cast if precision == "bf16" else 0)


def _rope_extra(cfg: ModelConfig) -> int:
    """Elements per token RoPE adds to attention: rotated q and k, and, with several heads, a copy of
    the attention output (from rotated q the kernels return it head-major, so merging the heads back
    copies it; without RoPE they return it token-major and the merge is a view)."""
    if cfg.pos_emb != "rope":
        return 0
    return 2 * cfg.d_model + (cfg.d_model if cfg.heads > 1 else 0)


def activation_bytes(
    cfg: ModelConfig,
    micro_batch: int = 1,
    precision: str = "bf16",
    ep: int = 1,
    expert_parallel: bool | None = None,
) -> dict[str, int]:
    """Bytes autograd keeps from one forward of `micro_batch` sequences to its backward, plus the
    logits the forward returns, by part (docstring of this module); `total` sums them. The experts
    run the expert-parallel kernel when ep > 1 (or `expert_parallel` says so), each rank holding
    n_experts / ep of them."""
    _check(micro_batch, precision)
    kernel_ep = ep > 1 if expert_parallel is None else expert_parallel
    a = ACT_BYTES[precision]
    T, d, V = cfg.seq_len, cfg.d_model, cfg.vocab_size
    N = micro_batch * T
    rope = cfg.pos_emb == "rope"
    parts = dict.fromkeys(("embedding", "attention", "norms", "ffn", "router", "dispatch"), 0)
    parts["embedding"] = N * INDEX + (0 if rope else T * INDEX)
    k_act = 1 if cfg.activation == "relu" else 2
    S = slots_per_layer(cfg, micro_batch) if cfg.ffn == "moe" else 0
    tc = cfg.ffn == "moe" and routes_by_token(cfg, micro_batch)
    # RoPE under autocast: bf16 copies of the cos and sin tables, for q and for k
    rope_tables = 4 * T * ((d // cfg.heads + 1) // 2) * a if rope and precision == "bf16" else 0
    for i in range(cfg.n_blocks):
        parts["attention"] += N * (a * (5 * d + _rope_extra(cfg)) + F32 * cfg.heads) + rope_tables
        parts["norms"] += N * 2 * (F32 * d + 2 * F32)
        if cfg.is_moe_block(i):
            for key, v in _moe_bytes(cfg, S, N, a, kernel_ep, tc).items():
                parts[key] += v
        else:
            parts["ffn"] += N * a * (d + k_act * cfg.d_ff)
    parts["norms"] += N * (F32 * d + 2 * F32) if cfg.final_norm else 0
    parts["weight_copies"] = _weight_copies(param_counts(cfg), precision, ep, kernel_ep, tc)
    # head input, logits, log-softmax, targets and the loss's weight sum
    parts["logits"] = N * (a * d + (a + F32) * V + INDEX) + F32
    parts["total"] = sum(parts.values())
    return parts


def memory_per_device(
    model: Any,
    layout: Layout,
    micro_batch: int = 1,
    precision: str = "bf16",
    seq_len: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, int]:
    """Bytes per device for training `model` (a ModelConfig or a planned Architecture) in `layout`
    with `micro_batch` sequences per forward: weights, gradients, optimizer, activations, buffers and
    their total. A peak estimate: gradients, activations and buffers are added as if all were held
    at once (with gradient accumulation they are)."""
    cfg = model_config(model, seq_len, vocab_size)
    _check(micro_batch, precision)
    c = param_counts(cfg)
    if layout.ep > 1 and (cfg.ffn != "moe" or cfg.n_experts % layout.ep):
        raise ConfigError(f"ep={layout.ep} must divide the model's {cfg.n_experts} experts")
    local = c.total - c.experts + c.experts // layout.ep
    if layout.fsdp and layout.devices > 1:
        local = c.total / layout.devices
    out = {
        "weights": round(F32 * local) + c.buffer_bytes,
        "gradients": round(F32 * local),
        "optimizer": round(2 * F32 * local) + F32 * c.tensors,
        "activations": activation_bytes(cfg, micro_batch, precision, layout.ep)["total"],
        "buffers": _buffers(cfg, c, layout, micro_batch),
    }
    out["total"] = sum(out[k] for k in PART_KEYS)
    return out


def _buffers(cfg: ModelConfig, c: ParamCounts, layout: Layout, micro_batch: int) -> int:
    """Working memory beyond the four: DDP's gradient buckets (a flat copy of the replicated
    gradients), FSDP's gathered units (the root's weights and gradients, two blocks' weights with
    the prefetch, one block's gradients), and the logits' gradient at the start of backward."""
    logits_grad = 2 * F32 * micro_batch * cfg.seq_len * cfg.vocab_size
    if layout.devices == 1:
        return logits_grad
    if layout.fsdp:  # with EP, a gathered block holds only its ep share of the experts
        block = max(p - e + e // layout.ep for p, e in c.block_kinds)
        return logits_grad + F32 * (2 * c.root + 3 * block)
    return logits_grad + F32 * (c.total - (c.experts if layout.ep > 1 else 0))


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def candidate_layouts(cfg: ModelConfig, devices: int) -> list[Layout]:
    """The layouts `best_layout` tries, least communication first: DDP (one gradient all-reduce per
    step), then expert parallelism over ascending ep (all_to_all of routed tokens in every MoE layer;
    larger groups hold fewer experts), then FSDP (all-gathers of every block's weights in forward and
    backward and a reduce-scatter of its gradients: the most traffic, and it shards everything), then
    FSDP with EP (the same sharded state, smaller gathered blocks, and the all_to_all on top)."""
    out = [Layout(devices)]
    eps = [k for k in _divisors(math.gcd(devices, cfg.n_experts)) if k > 1] if cfg.ffn == "moe" else []
    out += [Layout(devices, ep=k) for k in eps]
    if devices > 1:
        out.append(Layout(devices, fsdp=True))
    out += [Layout(devices, fsdp=True, ep=k) for k in eps]
    return out


def _first_fit(cfg: ModelConfig, devices: int, usable: float, micro_batch: int, precision: str):
    """(every layout tried with its memory, the first that fits or None)."""
    tried = [
        (lay, memory_per_device(cfg, lay, micro_batch, precision)) for lay in candidate_layouts(cfg, devices)
    ]
    return tried, next(((lay, mem) for lay, mem in tried if mem["total"] <= usable), None)


def best_layout(
    model: Any,
    devices: int,
    device_memory: float,
    micro_batch: int = 1,
    precision: str = "bf16",
    seq_len: int | None = None,
    vocab_size: int | None = None,
    reserve: float = RESERVE,
) -> dict[str, Any]:
    """The first layout of `candidate_layouts` whose total fits in (1 - reserve) * device_memory, as
    the `layout` object of `finemoe plan --json`. When none fits, `fits` is false, the numbers are
    those of the layout that comes closest, and `reason` says what would fit (more devices, or a
    shorter micro-batch)."""
    if not (isinstance(devices, int) and devices >= 1):
        raise ConfigError(f"devices must be a whole number >= 1, got {devices!r}")
    if not (isinstance(device_memory, (int, float)) and math.isfinite(device_memory) and device_memory > 0):
        raise ConfigError(f"device memory must be a positive number of bytes, got {device_memory!r}")
    if not 0 <= reserve < 1:
        raise ConfigError(f"reserve must be a fraction in [0, 1), got {reserve!r}")
    cfg = model_config(model, seq_len, vocab_size)
    _check(micro_batch, precision)
    usable = device_memory * (1 - reserve)
    tried, fit = _first_fit(cfg, devices, usable, micro_batch, precision)
    lay, mem = fit or min(tried, key=lambda t: t[1]["total"])
    out: dict[str, Any] = {
        "fits": fit is not None,
        "name": lay.name,
        "devices": devices,
        "fsdp": lay.fsdp,
        "ep": lay.ep,
        "dp": lay.dp,
        "micro_batch": micro_batch,
        "seq_len": cfg.seq_len,
        "vocab_size": cfg.vocab_size,
        "precision": precision,
        "bytes_per_device": mem,
        "device_memory": device_memory,
        "usable_memory": usable,
        "parallel": lay.parallel if fit else None,
        "command": torchrun_command(lay, micro_batch, cfg) if fit else None,
        "tried": [
            {"name": t.name, "fsdp": t.fsdp, "ep": t.ep, "fits": m["total"] <= usable, "bytes_per_device": m}
            for t, m in tried
        ],
    }
    if fit is None:
        out["reason"] = _no_fit_reason(cfg, devices, usable, micro_batch, precision, lay, mem)
    out["notes"] = _notes(cfg, lay, micro_batch)
    return out


def _notes(cfg: ModelConfig, lay: Layout, micro_batch: int) -> list[str]:
    """What the numbers assume that a run may not: Expert Choice's group size, FSDP without
    accumulation."""
    notes = []
    if cfg.ffn == "moe" and cfg.routing == "ec" and _ec_k(cfg, micro_batch)[1] is None:
        need = math.ceil(cfg.expansion_rate / cfg.capacity_factor)
        notes.append(
            f"Expert Choice routes groups of at least {need} sequences (E / capacity_factor); with "
            f"{micro_batch} per forward the layers route each token to its top experts instead"
        )
    if lay.fsdp:
        notes.append(
            "with gradient accumulation FSDP2 keeps whole (unsharded) gradients between micro-batches, "
            f"{_gb(F32 * param_counts(cfg).total)} more per device"
        )
    return notes


MAX_DEVICES = 2**20


def devices_needed(cfg: ModelConfig, devices: int, usable: float, micro_batch: int, precision: str):
    """The smallest of devices * 2, * 4, ... (up to MAX_DEVICES) on which some layout fits, with that
    layout and its memory; None if none does."""
    d = 2 * devices
    while d <= MAX_DEVICES:
        fit = _first_fit(cfg, d, usable, micro_batch, precision)[1]
        if fit is not None:
            return d, *fit
        d *= 2
    return None


def _gb(x: float) -> str:
    return f"{x / 1e9:.3g} GB"


def _no_fit_reason(
    cfg: ModelConfig, devices: int, usable: float, micro_batch: int, precision: str, lay: Layout, mem: dict
) -> str:
    """What is missing when no layout fits: how many devices would do, or else what grows with the
    tokens of a forward (activations), which only a shorter micro-batch or sequence shrinks."""
    head = (
        f"no layout fits on {devices} device{'s' * (devices > 1)}: the closest, {lay.name}, needs "
        f"{_gb(mem['total'])} per device, {_gb(usable)} usable"
    )
    more = devices_needed(cfg, devices, usable, micro_batch, precision)
    if more is not None:
        d, lay2, mem2 = more
        return f"{head}; doubling the devices, {d} fit: {lay2.name} at {_gb(mem2['total'])} per device"
    tail = "; no device count fits"
    if micro_batch > 1:
        tail += ": try a micro-batch of 1"
    return f"{head}{tail}; activations take {_gb(mem['activations'])} at {micro_batch} x {cfg.seq_len} tokens"


def torchrun_command(layout: Layout, micro_batch: int, cfg=None, config: str = "CONFIG.yaml") -> str:
    """The launch line for a training config under this layout (the layout's keys as overrides). Expert
    Choice groups the micro-batch's sequences, so the run does not depend on the layout (the trainer
    requires a group size for micro-batches)."""
    overrides = [f"parallel.{k}={str(v).lower()}" for k, v in layout.parallel.items()]
    overrides.append(f"micro_batch_size={micro_batch}")
    if cfg is not None and cfg.ffn == "moe" and cfg.routing == "ec":
        overrides.append(f"model.ec_group_size={micro_batch}")
    if layout.devices == 1:
        return " ".join(["finemoe train", config, *overrides])
    launch = f"python -m torch.distributed.run --standalone --nproc_per_node {layout.devices}"
    return " ".join([launch, "-m finemoe train", config, *overrides])
