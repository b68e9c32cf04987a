"""Training configuration: one validated dataclass, nesting the ModelConfig, loadable from YAML.

Defaults follow the paper's training setup (paper notes §3): AdamW with weight decay 0.1 and the code's
betas (0.9, 0.999), peak LR 2e-4 with linear warmup over 1% of steps and cosine decay to 10% of peak
over the whole run, gradient clipping at 0.5. The token budget `tokens` (D) fixes the run length:
steps = tokens // (batch_size * seq_len), and the schedule is stretched to exactly that many steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finemoe import schema
from finemoe.config import CPU_MATMULS, ModelConfig, check_known_keys, require
from finemoe.errors import ConfigError
from finemoe.io import read_text
from finemoe.train.schedule import COOLDOWN_SHAPES, WarmupCosine, WarmupStableDecay

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "wsd")
LOGGERS = ("none", "tensorboard", "wandb")  # experiment trackers beside metrics.jsonl (finemoe.train.loggers)
NESTED = ("model", "parallel")  # sections of a training config that are mappings of their own


@dataclass(frozen=True)
class ParallelConfig:
    """How a run launched by torchrun spreads over its ranks (docs/distributed.md). Every rank holds a
    replica under plain data parallelism (DDP); `fsdp` shards parameters, gradients and optimizer
    states over the ranks instead (FSDP2's fully_shard on a DeviceMesh); `ep` splits every MoE layer's
    experts over groups of that many ranks (expert parallelism), the rest staying DDP replicas, or
    FSDP shards with `fsdp` too."""

    fsdp: bool = False
    ep: int = 1

    def __post_init__(self) -> None:
        schema.check(self, "parallel")
        require(self.ep >= 1, f"parallel.ep must be >= 1, got {self.ep}")

    @property
    def sharded_checkpoints(self) -> bool:
        """Checkpoints as DCP shards (any world size can resume them) rather than one ckpt.pt."""
        return self.fsdp or self.ep > 1

    @classmethod
    def from_dict(cls, data: Any) -> "ParallelConfig":
        if isinstance(data, ParallelConfig):
            return data
        require(isinstance(data, dict), "parallel must be a mapping such as {fsdp: true}")
        check_known_keys(cls, data, "parallel")
        return cls(**schema.coerce(cls, data))


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    out_dir: str = "runs/run"
    data_dir: str = "data/default"  # holds train.bin/val.bin (+ .json sidecars) and tokenizer.json
    train_file: str = "train.bin"
    val_file: str | None = "val.bin"  # None: no validation
    tokens: int = 10_000_000  # D, the token budget; sets the run length and the schedule
    batch_size: int = 16  # global sequences per step, split across DDP ranks
    # sequences per forward on each rank; the rank's share of the batch accumulates over micro-batches
    # of this size. None: the whole share in one forward
    micro_batch_size: int | None = None
    seed: int = 0
    # optimizer and schedule
    lr: float = 2e-4
    final_lr_fraction: float = 0.1
    warmup_fraction: float = 0.01
    warmup_tokens: int | None = None  # fixed warmup length, independent of D (WSD branches share it)
    schedule: str = "cosine"  # the paper's cosine, or warmup-stable-decay (WSD)
    cooldown_fraction: float = 0.2  # WSD: the decay covers this fraction of the steps
    cooldown_shape: str = "1-sqrt"  # WSD: linear or 1-sqrt (Hägele et al. 2024)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only: not norms, biases or embeddings
    grad_clip: float | None = 0.5
    # MoE auxiliary losses, added to the LM loss when the FFN reports them. The paper uses Expert Choice
    # with no auxiliary loss (its lb_loss is zero); the balance weight matters for token choice only.
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    # logging, evaluation, checkpoints
    eval_every: int = 200  # steps; also at the end
    eval_batches: int = 8
    ckpt_every: int = 200  # steps; also at the end
    log_every: int | None = None  # progress lines off a terminal, in steps; None: about 20 per run
    log: str | tuple[str, ...] = "none"  # none, tensorboard, wandb, or a list of them
    smooth_window: int | None = None  # steps in the final train loss; None: max(1, 10% of steps)
    smooth_fraction: float = 0.1
    # WSD branches: a stable run saves snapshots/step_<s>.pt at these steps, and a shorter run whose
    # `init_from` names such a snapshot starts there instead of at step 0 (it computes the same either way)
    snapshot_steps: tuple[int, ...] = ()
    init_from: str | None = None
    # execution
    device: str = "auto"
    dtype: str = "auto"  # fp32 on CPU, bf16 autocast on CUDA
    compile: bool = False
    threads: int | None = None  # torch intra-op threads; None: torch's default
    cpu_matmul: str = "mkl"  # fp32 CPU matmuls: torch's MKL sgemm, or oneDNN (finemoe.kernels.cpu_matmul)
    deterministic: bool = False  # torch.use_deterministic_algorithms (CPU runs are reproducible anyway)
    # end this invocation at this step, with a checkpoint there (a job under a time limit); --resume goes on
    stop_at_step: int | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        require(isinstance(self.model, ModelConfig), "model must be a mapping of ModelConfig fields")
        object.__setattr__(self, "parallel", ParallelConfig.from_dict(self.parallel))
        object.__setattr__(self, "log", _log_choice(self.log))
        schema.check(self, "train")
        require(0 <= self.seed < 2**32, f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        require(self.tokens >= 1, f"tokens (the budget D) must be >= 1, got {self.tokens}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None:
            require(
                1 <= self.micro_batch_size <= self.batch_size
                and self.batch_size % self.micro_batch_size == 0,
                f"micro_batch_size must divide batch_size={self.batch_size}, got {self.micro_batch_size}",
            )
        group = self.model.ec_group_size if self.model.ffn == "moe" else None
        if group is not None:
            require(
                self.batch_size % group == 0 and (self.micro_batch_size or group) % group == 0,
                f"model.ec_group_size={group} must divide batch_size={self.batch_size}"
                + (f" and micro_batch_size={self.micro_batch_size}" if self.micro_batch_size else ""),
            )
        require(
            self.steps >= 1,
            f"tokens={self.tokens} is less than one step of batch_size*seq_len="
            f"{self.tokens_per_step}; raise tokens or lower batch_size/seq_len",
        )
        require(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}")
        require(
            0 <= self.final_lr_fraction <= 1,
            f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}",
        )
        require(
            0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
        )
        require(
            self.warmup_tokens is None or self.warmup_tokens >= 0,
            f"warmup_tokens must be >= 0 or null, got {self.warmup_tokens}",
        )
        require(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(
            0 < self.cooldown_fraction <= 1,
            f"cooldown_fraction must be in (0, 1], got {self.cooldown_fraction}",
        )
        require(
            self.cooldown_shape in COOLDOWN_SHAPES,
            f"cooldown_shape must be one of {COOLDOWN_SHAPES}, got {self.cooldown_shape!r}",
        )
        require(
            self.warmup_steps <= self.steps,
            f"the warmup ({self.warmup_steps} steps) is longer than the run ({self.steps} steps); "
            "lower warmup_tokens or warmup_fraction",
        )
        if self.schedule == "wsd":
            require(
                self.warmup_steps <= self.decay_start,
                f"the warmup ({self.warmup_steps} steps) runs into the cooldown, which starts at step "
                f"{self.decay_start}; lower warmup_tokens/warmup_fraction or cooldown_fraction",
            )
        object.__setattr__(self, "snapshot_steps", tuple(sorted(set(self.snapshot_steps))))
        require(
            all(
                isinstance(s, int) and self.warmup_steps <= s <= self.decay_start for s in self.snapshot_steps
            ),
            f"snapshot_steps must be whole steps between the warmup's end ({self.warmup_steps}) and the "
            f"decay's start ({self.decay_start}), got {list(self.snapshot_steps)}",
        )
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two numbers in [0, 1), got {list(self.betas)}",
        )
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        require(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or null, got {self.grad_clip}",
        )
        require(
            self.lb_loss_weight >= 0 and self.z_loss_weight >= 0,
            "lb_loss_weight and z_loss_weight must be >= 0",
        )
        require(
            self.eval_every >= 1 and self.ckpt_every >= 1, "eval_every and ckpt_every must be >= 1 (steps)"
        )
        require(
            self.log_every is None or self.log_every >= 1,
            f"log_every must be >= 1 or null, got {self.log_every}",
        )
        require(self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}")
        require(
            self.smooth_window is None or self.smooth_window >= 1,
            f"smooth_window must be >= 1 or null, got {self.smooth_window}",
        )
        require(
            0 < self.smooth_fraction <= 1, f"smooth_fraction must be in (0, 1], got {self.smooth_fraction}"
        )
        require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(
            self.threads is None or self.threads >= 1, f"threads must be >= 1 or null, got {self.threads}"
        )
        require(
            self.cpu_matmul in CPU_MATMULS,
            f"cpu_matmul must be one of {CPU_MATMULS}, got {self.cpu_matmul!r}",
        )
        require(bool(self.out_dir), "out_dir must be a folder path")
        require(
            self.stop_at_step is None or self.stop_at_step >= 1,
            f"stop_at_step must be >= 1 or null, got {self.stop_at_step}",
        )
        require(
            not (self.compile and self.parallel.ep > 1),
            "compile with parallel.ep > 1 is not supported yet (DDP would take the expert shards); drop one",
        )
        if self.parallel.ep > 1:
            require(
                self.model.ffn == "moe" and self.model.n_experts % self.parallel.ep == 0,
                f"parallel.ep={self.parallel.ep} must divide the {self.model.n_experts} experts of an MoE "
                "model; pick a divisor of E*G",
            )

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def warmup_steps(self) -> int:
        """round(1% of steps), as the paper's code (`lr_warmup_steps = round(0.01 * n_steps)`), unless
        warmup_tokens fixes it."""
        if self.warmup_tokens is not None:
            return round(self.warmup_tokens / self.tokens_per_step)
        return round(self.warmup_fraction * self.steps)

    @property
    def decay_start(self) -> int:
        """The first step below the peak LR after warmup: where a WSD branch of this length begins."""
        return self.lr_multiplier().decay_start if self.schedule == "wsd" else self.warmup_steps

    def lr_multiplier(self) -> WarmupCosine | WarmupStableDecay:
        """The LR schedule as a multiplier of the peak for each step (torch's LambdaLR takes it)."""
        if self.schedule == "wsd":
            cooldown = max(1, round(self.cooldown_fraction * self.steps))
            return WarmupStableDecay(
                self.steps, self.warmup_steps, cooldown, self.final_lr_fraction, self.cooldown_shape
            )
        return WarmupCosine(self.steps, self.warmup_steps, self.final_lr_fraction)

    @property
    def window(self) -> int:
        """Steps averaged into the final train loss (the paper fits the smoothed train loss)."""
        if self.smooth_window is not None:
            return min(self.smooth_window, self.steps)
        return max(1, int(self.smooth_fraction * self.steps))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["snapshot_steps"] = list(self.snapshot_steps)
        if isinstance(self.log, tuple):
            d["log"] = list(self.log)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TrainConfig":
        require(
            data is None or isinstance(data, dict),
            f"a training config must be a mapping, got {type(data).__name__}",
        )
        data = dict(data or {})
        check_known_keys(cls, data, "training")
        if "model" in data:
            m = data["model"]
            require(isinstance(m, (dict, ModelConfig)), "model must be a mapping of ModelConfig fields")
            data["model"] = m if isinstance(m, ModelConfig) else ModelConfig.from_dict(m)
        if "parallel" in data:
            data["parallel"] = ParallelConfig.from_dict(data["parallel"])
        return cls(**schema.coerce(cls, data))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/tiny.yaml")
        try:
            data = yaml.safe_load(read_text(path, "config")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        require(isinstance(data, dict), f"{path} must hold a mapping of training keys")
        return cls.from_dict(apply_overrides(data, overrides or []))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _log_choice(value: Any) -> str | tuple[str, ...]:
    """`log` as one name, or a tuple of two or more without repeats ("none" and [] both mean none)."""
    names = [value] if isinstance(value, str) else value
    require(
        isinstance(names, (list, tuple)) and all(isinstance(n, str) and n in LOGGERS for n in names),
        f"log must be one of {LOGGERS} or a list of them, got {value!r}",
    )
    chosen = tuple(dict.fromkeys(n for n in names if n != "none"))
    return chosen[0] if len(chosen) == 1 else (chosen or "none")


def write_planned_config(path: str | Path, arch: Any, expansion_rate: float) -> str:
    """A `finemoe train` config for a planned architecture (finemoe.scaling.plan.Architecture) and its
    tokens; data, batch and LR stay at the defaults, to set for one's corpus and hardware."""
    import yaml

    from finemoe.io import ensure_dir, write_text_atomic

    model = {
        "d_model": arch.d_model,
        "n_blocks": arch.n_blocks,
        "head_dim": arch.d_model // arch.n_heads,
        "ffn": "moe",
        "expansion_rate": int(round(expansion_rate)),
        "granularity": arch.granularity,
    }
    cfg = TrainConfig.from_dict(
        {"model": model, "tokens": int(arch.tokens), "out_dir": f"runs/plan-{Path(path).stem}"}
    )
    ensure_dir(Path(path).parent, "config folder")
    text = (
        "# written by `finemoe plan`: the planned architecture and tokens; set data_dir, batch_size and lr\n"
        "# for your corpus and hardware before training\n"
    )
    write_text_atomic(path, text + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return str(path)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` / `model.key=value` / `parallel.key=value` strings; values are parsed as YAML
    scalars."""
    import yaml

    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        require(bool(sep) and bool(key), f"override {item!r} must look like key=value or model.key=value")
        value = yaml.safe_load(text) if text else None
        parts = key.split(".")
        require(
            len(parts) <= 2 and (len(parts) == 1 or parts[0] in NESTED),
            f"override key {key!r}: only model.<key> and parallel.<key> nest",
        )
        if len(parts) == 2:
            data.setdefault(parts[0], {})
            require(isinstance(data[parts[0]], dict), f"{parts[0]} must be a mapping")
            data[parts[0]][parts[1]] = value
        else:
            data[key] = value
    return data


__all__ = ["ParallelConfig", "TrainConfig", "apply_overrides", "write_planned_config"]
