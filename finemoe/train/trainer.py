"""The training loop: one run of a TrainConfig to its token budget, resumable bit for bit.

The run's outputs live in `out_dir`: `metrics.jsonl` (one line per step, validation every eval_every
steps and at the end), `ckpt.pt` (every ckpt_every steps and at the end), `config.json` (the resolved
TrainConfig), `model/` (safetensors weights at the end) and `final.json`, the record a scaling-law fit
reads. `train_loss` in it is the paper's fitting target: the mean train loss over the last
`cfg.window` steps (10% of the run by default; the paper's code averages the last 1000 steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finemoe.accounting import exact_params, paper_counts
from finemoe.data.tokens import TokenFile
from finemoe.errors import ConfigError, DataError
from finemoe.io import ensure_dir, finite_or_none, write_json_atomic
from finemoe.kernels.cpu_matmul import cpu_matmul
from finemoe.nn.experts import Experts
from finemoe.nn.model import Transformer, save_pretrained
from finemoe.nn.moe import MoE
from finemoe.nn.moe import batch_routing as moe_batch_routing
from finemoe.parallel import dcp, expert_parallel
from finemoe.parallel import wrap as parallel
from finemoe.train import checkpoint, distributed
from finemoe.train.config import TrainConfig
from finemoe.train.loggers import check_installed, open_loggers
from finemoe.train.metrics import METRICS_NAME, MetricsLog, Smoother, imbalance
from finemoe.train.progress import BarProgress, LineProgress

FINAL_NAME = "final.json"
# Settings that may change between a run and its resumption without changing what it computes (the
# thread count and the CPU matmul path change float rounding only).
RESUMABLE_CHANGES = {
    "out_dir",
    "data_dir",
    "device",
    "compile",
    "threads",
    "cpu_matmul",
    "eval_every",
    "ckpt_every",
    "deterministic",
    "snapshot_steps",
    "init_from",
    "log_every",
    "log",  # a resumed run may add or drop a tracker
    "stop_at_step",
    "parallel",  # DCP reshards; one-file checkpoints load only unsharded (see _restore)
}
# What a WSD branch may change against the stable run it starts from (the schedules are compared apart).
BRANCH_CHANGES = RESUMABLE_CHANGES | {"tokens", "smooth_window"}
SNAPSHOT_DIR = "snapshots"


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run `cfg` to its token budget (or to divergence) and return the final record.

    With resume=True a run continues from `out_dir/ckpt.pt` if there is one (and a finished run just
    returns its record), so a sweep can call this again after any crash.
    """
    device = resolve_device(cfg.device)
    dist = distributed.setup(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    try:
        with cpu_matmul(cfg.cpu_matmul):
            return _Run(cfg, device, dist, quiet).run(resume)
    finally:
        distributed.teardown(dist)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use device: cpu or auto")
    return torch.device(name)


def autocast_for(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default; fp32 on CPU (no AMX on typical CPUs: bf16 GEMM is slower)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (attention, FFN, experts, router, head); not norms, biases or embeddings."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in no_decay else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Run:
    def __init__(self, cfg: TrainConfig, device: torch.device, dist: distributed.Dist, quiet: bool):
        self.cfg, self.device, self.dist, self.quiet = cfg, device, dist, quiet
        self.out = Path(cfg.out_dir)
        self.autocast = autocast_for(cfg, device)
        self.counts = paper_counts(cfg.model)
        self.branched_at = 0  # steps taken from a stable run's snapshot rather than trained here

    # ---- setup -------------------------------------------------------------------------------
    def _open_data(self) -> tuple[TokenFile, TokenFile | None]:
        cfg, data = self.cfg, Path(self.cfg.data_dir)
        train = TokenFile(data / cfg.train_file)
        val = TokenFile(data / cfg.val_file) if cfg.val_file else None
        for tf in (train, val):
            if tf is not None and tf.vocab_size > cfg.model.vocab_size:
                raise DataError(
                    f"{tf.path} uses a vocabulary of {tf.vocab_size} but "
                    f"model.vocab_size={cfg.model.vocab_size}; "
                    f"set model.vocab_size to at least {tf.vocab_size}"
                )
        train.check_fits(cfg.batch_size, cfg.seq_len)
        if cfg.batch_size % self.dist.world_size:
            raise ConfigError(
                f"batch_size {cfg.batch_size} is not divisible by the {self.dist.world_size} processes"
            )
        self._check_micro_batches()
        if val is not None and val.n_windows(cfg.seq_len) < self.dist.world_size:
            raise DataError(
                f"{val.path} holds fewer than {self.dist.world_size} sequences of {cfg.seq_len + 1} tokens; "
                "use more validation text"
            )
        return train, val

    def _check_micro_batches(self) -> None:
        """Each rank's share of the batch splits into whole micro-batches, and Expert Choice groups do
        not change with the world size or the micro-batch."""
        cfg, world = self.cfg, self.dist.world_size
        if world % cfg.parallel.ep:
            raise ConfigError(
                f"parallel.ep={cfg.parallel.ep} does not divide the {world} processes; launch a multiple of "
                "it or lower parallel.ep"
            )
        local = cfg.batch_size // world
        micro = cfg.micro_batch_size or local
        if local % micro:
            raise ConfigError(
                f"micro_batch_size {micro} does not divide the {local} sequences each of the {world} "
                "processes holds; pick a divisor of batch_size / processes"
            )
        m = cfg.model
        if m.ffn != "moe" or m.routing != "ec" or micro == cfg.batch_size:
            return
        if m.ec_group_size is None:
            raise ConfigError(
                f"Expert Choice would group the {micro} sequences of one forward, not the batch's "
                f"{cfg.batch_size}, so the run would depend on the process count and micro-batch; set "
                f"model.ec_group_size to a divisor of {micro}"
            )
        if micro % m.ec_group_size:
            raise ConfigError(
                f"model.ec_group_size={m.ec_group_size} does not divide the {micro} sequences of one "
                "forward on each process; pick a divisor of it"
            )

    def _build(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        seed_everything(cfg.seed)
        self.model = Transformer(cfg.model).to(self.device)
        self.sharded = self.dist.enabled and cfg.parallel.fsdp
        self.ep_mesh, ep_names = None, []
        if self.dist.enabled and cfg.parallel.ep > 1:
            self.ep_mesh = expert_parallel.mesh_for(self.dist.world_size, cfg.parallel.ep, self.device)
            ep_names = expert_parallel.shard_experts(self.model, self.ep_mesh, fsdp=self.sharded)
        if self.sharded:
            parallel.shard(self.model, self.dist.world_size, self.device, self.ep_mesh)
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        self.step_model = self.fwd
        if self.dist.enabled and not self.sharded:
            self.step_model = parallel.replicate(self.fwd, self.device, ep_names)
        # one multi-tensor kernel over all weights, unless they live on several meshes (expert
        # parallelism), which the fused and foreach implementations do not promise to mix
        mixed = parallel.mesh_count(self.model) > 1 or (self.ep_mesh is not None and not self.sharded)
        self.opt = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=(self.device.type == "cuda" and not mixed) or None,
            foreach=False if mixed else None,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cfg.lr_multiplier())

    def _checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint to resume from and its contents (a sharded one's metadata only), if any."""
        folder = dcp.find(self.out / checkpoint.SHARDED_NAME)
        if folder is not None:
            return folder, dcp.load_meta(folder)
        path = self.out / checkpoint.CKPT_NAME
        return (path, checkpoint.load(path)) if path.is_file() else None

    def _restore(self, path: Path, ckpt: dict[str, Any]) -> None:
        diff = config_diff(ckpt["config"], self.cfg, RESUMABLE_CHANGES)
        if diff:
            raise ConfigError(
                f"{path} was written with a different config ({', '.join(diff)} differ); "
                "resume with the same config or pick a new out_dir"
            )
        if "model" in ckpt:
            if parallel.sharded(self.model):
                raise ConfigError(
                    f"{path} is a one-file checkpoint, written without parallel.fsdp or ep; resume it "
                    "with the parallel settings it was written with"
                )
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
        else:
            dcp.load(path, self.model, self.opt)
        self.sched.load_state_dict(ckpt["scheduler"])
        checkpoint.set_rng_state(ckpt["rng"])

    def _branch(self, path: Path) -> dict[str, Any] | None:
        """Start from a stable run's snapshot when it computes exactly what training from step 0 would.

        That holds when the configs differ only in length and the two LR schedules agree on every step
        before the snapshot. A missing snapshot (its run was never trained here) is not an error: the run
        then trains from step 0 and reaches the same result, only slower.
        """
        folder = None if path.is_file() else dcp.find(path.with_suffix(""))  # a sharded run's snapshot
        if not path.is_file() and folder is None:
            return None
        snap = checkpoint.load(path) if folder is None else dcp.load_meta(folder)
        needed = ("step", "config", "scheduler", "rng", "losses")
        needed += ("model", "optimizer") if folder is None else ()  # a DCP folder holds those as shards
        if not isinstance(snap, dict) or any(k not in snap for k in needed):
            raise ConfigError(
                f"init_from {path} is not a finemoe snapshot; point at a stable run's snapshots/step_N.pt"
            )
        step, parent = snap["step"], TrainConfig.from_dict(snap["config"])
        diff = config_diff(snap["config"], self.cfg, BRANCH_CHANGES)
        ours, theirs = self.cfg.lr_multiplier(), parent.lr_multiplier()
        if step >= self.cfg.steps:
            raise ConfigError(
                f"init_from {path} is at step {step}, past this run's {self.cfg.steps} steps; "
                "branch from a snapshot before this run's decay start"
            )
        if diff or any(ours(s) != theirs(s) for s in range(step)):
            why = f"{', '.join(diff)} differ" if diff else "its LR schedule differs before the snapshot"
            raise ConfigError(
                f"init_from {path} cannot start this run ({why}); branch only from a stable run of "
                "the same config, at or before this run's decay start"
            )
        if folder is not None:
            dcp.load(folder, self.model, self.opt)  # resharded to this run's layout
        elif parallel.sharded(self.model):
            raise ConfigError(
                f"init_from {path} is a one-file snapshot, which a sharded (fsdp or ep) run cannot load; "
                "branch without parallel.fsdp and ep, or from a stable run trained with them"
            )
        else:
            self.model.load_state_dict(snap["model"])
            self.opt.load_state_dict(snap["optimizer"])
        self.sched.load_state_dict({**snap["scheduler"], "lr_lambdas": [None] * len(self.opt.param_groups)})
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * ours(step)  # this run's own schedule from here on
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        checkpoint.set_rng_state(snap["rng"])
        return snap

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        cfg, out, main = self.cfg, self.out, self.dist.main
        final_path, ckpt_path = out / FINAL_NAME, out / checkpoint.CKPT_NAME
        if resume and final_path.is_file():
            record = json.loads(final_path.read_text())
            diff = config_diff(record.get("config") or {}, cfg, RESUMABLE_CHANGES)
            if diff:
                raise ConfigError(
                    f"{out} holds a finished run of a different config ({', '.join(diff)} differ); "
                    "train it with its own config or pick a new out_dir"
                )
            return record
        found = ckpt_path.exists() or dcp.find(out / checkpoint.SHARDED_NAME)
        if not resume and (final_path.exists() or found):
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it or choose another out_dir"
            )
        check_installed(cfg.log)  # every rank, before any work: no rank waits on one that failed
        self.train_data, self.val_data = self._open_data()
        self._build()

        start, history, elapsed, train_time = 0, [], 0.0, 0.0
        if resume and (saved := self._checkpoint()) is not None:
            ckpt = saved[1]
            self._restore(*saved)
            start, history = ckpt["step"], ckpt["losses"]
            elapsed, train_time = ckpt["elapsed"], ckpt["train_time"]
            self.branched_at = ckpt.get("branched_at", 0)
        elif cfg.init_from and (snap := self._branch(Path(cfg.init_from))) is not None:
            start, history = snap["step"], snap["losses"]
            self.branched_at = start
        distributed.barrier(self.dist)  # every rank has read the checkpoint before rank 0 rewrites it
        if main:
            ensure_dir(out, "run folder")
            for stale in [
                *out.glob(".*.tmp"),
                *out.glob("*/.*.tmp"),
            ]:  # a kill mid-write leaves its temp file (or a sharded checkpoint's temp folder)
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)
            write_json_atomic(out / "config.json", cfg.to_dict())
            tok = Path(cfg.data_dir) / "tokenizer.json"
            if tok.is_file() and not (out / "tokenizer.json").is_file():
                shutil.copyfile(tok, out / "tokenizer.json")  # the run folder can sample text on its own
        trackers, failed = None, None
        if main:
            try:
                trackers = open_loggers(cfg.log, cfg.to_dict(), out, start if resume else None)
            except Exception as e:  # every rank learns of it below, rather than wait in a collective
                failed = e
        if not distributed.all_ok(failed is None, self.dist):
            if failed is not None:
                raise failed
            raise ConfigError("rank 0 could not open the run's loggers (its error says why)")
        log = MetricsLog(out / METRICS_NAME, start if resume else None) if main else None
        smoother = Smoother(cfg.window, history)
        status, val_loss, completed = "done", None, start
        t_start = time.perf_counter()
        bar = self._progress(start)
        try:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                rec = self._step(step)
                dt = time.perf_counter() - t0
                train_time += dt
                if rec is None:
                    status = "diverged"
                    if main:
                        log.write({"step": step + 1, "status": status})
                    break
                rec.update(
                    loss_smooth=smoother.add(rec["loss"]),
                    tokens_per_s=cfg.tokens_per_step / dt,
                    flops_per_s=self.counts["flops_per_token"] * cfg.tokens_per_step / dt,
                    time_s=elapsed + time.perf_counter() - t_start,
                )
                done = completed = step + 1
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    val_loss = self.evaluate()
                    rec["val_loss"] = val_loss
                if main:
                    log.write(rec)
                    trackers.log(done, rec)
                if bar is not None:
                    bar.step(done, rec)
                stop = done == cfg.stop_at_step and done < cfg.steps
                if done % cfg.ckpt_every == 0 or done == cfg.steps or stop:
                    self._save(
                        done, list(smoother.losses), elapsed + time.perf_counter() - t_start, train_time
                    )
                if done in cfg.snapshot_steps:
                    self._save(
                        done,
                        list(smoother.losses),
                        elapsed + time.perf_counter() - t_start,
                        train_time,
                        out / SNAPSHOT_DIR / f"step_{done}.pt",
                    )
                if stop:
                    status = "stopped"  # a checkpoint is written: resume continues from here
                    break
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
            if trackers is not None:
                trackers.close()

        if status == "stopped":
            return {"status": status, "steps": completed, "out_dir": str(out)}
        if status == "done" and start == cfg.steps:  # killed after the last checkpoint, before final.json
            val_loss = self.evaluate()
        trained = completed * cfg.tokens_per_step
        record = self._record(
            status,
            smoother.value if status == "done" else math.nan,
            val_loss if status == "done" else None,
            trained,
            elapsed + time.perf_counter() - t_start,
            train_time,
            completed,
        )
        if status == "done" and any(isinstance(m, MoE) and m.calibrated for m in self.model.modules()):
            # the same validation batches, each sequence routed alone as inference routes it, with the
            # thresholds the saved model carries (pooled over the ranks)
            distributed.broadcast_buffers(self.model, self.dist)
            record["val_loss_independent"] = self.evaluate(batch_routing=False)
        weights = parallel.full_state(self.model) if status == "done" else None  # all ranks gather
        if main:
            if status == "done":
                save_pretrained(self.model, out / "model", weights)
            write_json_atomic(final_path, record)
        distributed.barrier(self.dist)
        return record

    def _step(self, step: int) -> dict[str, Any] | None:
        """One optimizer step; None if the loss or the gradient is not finite (the run diverged)."""
        cfg = self.cfg
        x, y = self.train_data.batch(
            step, cfg.batch_size, cfg.seq_len, cfg.seed, self.dist.rank, self.dist.world_size
        )
        x = torch.from_numpy(x).to(self.device, non_blocking=True)
        y = torch.from_numpy(y).to(self.device, non_blocking=True)
        lr = self.opt.param_groups[0]["lr"]
        micro = cfg.micro_batch_size or x.shape[0]
        n = x.shape[0] // micro
        self.opt.zero_grad(set_to_none=True)
        loss, aux = 0.0, {}
        for i in range(n):  # micro-batches of equal size: the mean of their means is the batch's mean
            part = slice(i * micro, (i + 1) * micro)
            with parallel.gradient_sync(self.step_model, i == n - 1):
                with self.autocast():
                    out = self.step_model(x[part], y[part])
                total = out.loss
                if "lb_loss" in out.aux and cfg.lb_loss_weight:
                    total = total + cfg.lb_loss_weight * out.aux["lb_loss"]
                if "z_loss" in out.aux and cfg.z_loss_weight:
                    total = total + cfg.z_loss_weight * out.aux["z_loss"]
                (total / n).backward()
            loss = loss + out.loss.detach() / n
            for key, value in out.aux.items():
                aux[key] = aux.get(key, 0.0) + value.detach() / n
            del out, total  # the logits and any unused aux graph go before the next forward
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        if self.ep_mesh is not None:  # weights on several meshes, or shards beside replicas
            expert_parallel.finish_expert_grads(self.model, self.ep_mesh, self.dist.world_size, self.sharded)
            grad_norm = parallel.clip_grad_norm(self.model.parameters(), max_norm)
        else:
            grad_norm = parallel.local_value(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            )
        loss_val = distributed.mean(loss.detach().float(), self.dist).item()
        if not (math.isfinite(loss_val) and math.isfinite(grad_norm.item())):
            return None
        self.opt.step()
        self.sched.step()
        rec: dict[str, Any] = {
            "step": step + 1,
            "tokens": (step + 1) * cfg.tokens_per_step,
            "loss": loss_val,
            "lr": lr,
            "grad_norm": grad_norm.item(),
        }
        for key in ("lb_loss", "z_loss"):
            if key in aux:
                rec[key] = distributed.mean(aux[key].detach().float(), self.dist).item()
        if "load" in aux:
            rec["imbalance"] = imbalance(distributed.mean(aux["load"].detach().float(), self.dist))
        return rec

    @torch.no_grad()
    def evaluate(self, batch_routing: bool = True) -> float | None:
        """Mean loss over the same fixed validation batches every time (no window used twice).

        Expert Choice layers route as in training (groups across the batch) unless batch_routing is
        False: then each sequence is routed alone, by the calibrated thresholds, as inference does."""
        if self.val_data is None:
            return None
        with moe_batch_routing(self.model, batch_routing):
            return self._evaluate()

    def _evaluate(self) -> float | None:
        cfg, d = self.cfg, self.dist
        n_win = self.val_data.n_windows(cfg.seq_len)
        bs = min(cfg.batch_size, n_win - n_win % d.world_size)
        n_batches = min(cfg.eval_batches, n_win // bs)
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(n_batches):
            x, y = self.val_data.batch(i, bs, cfg.seq_len, cfg.seed, d.rank, d.world_size)
            x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
            micro = cfg.micro_batch_size or len(x)
            parts = len(x) // micro if len(x) % micro == 0 else 1  # as training splits its batches
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                with self.autocast():
                    total += self.fwd(xs, ys).loss.float() / parts
        self.model.train()
        return finite_or_none(distributed.mean(total / n_batches, d).item())

    def _save(
        self, step: int, losses: list[float], elapsed: float, train_time: float, path: Path | None = None
    ) -> None:
        distributed.pool_thresholds(self.model, self.dist)  # what resumes and branches start from
        meta = dict(
            scheduler=self.sched.state_dict(),
            step=step,
            losses=losses,
            elapsed=elapsed,
            train_time=train_time,
            branched_at=self.branched_at,
            config=self.cfg.to_dict(),
        )
        if self.cfg.parallel.sharded_checkpoints:  # every rank writes its shards
            # a snapshot step_N.pt is then the DCP folder step_N (`_branch` reads either)
            folder = self.out / checkpoint.SHARDED_NAME if path is None else path.with_suffix("")
            checkpoint.save_sharded(folder, self.model, self.opt, **meta)
            if self.dist.main and path is None:  # the checkpoint of an unsharded earlier leg, now behind
                (self.out / checkpoint.CKPT_NAME).unlink(missing_ok=True)
            distributed.barrier(self.dist)
            return
        if self.dist.main:
            if path is not None:
                ensure_dir(path.parent, "snapshot folder")
            checkpoint.save(
                path or self.out / checkpoint.CKPT_NAME,
                model=self.model.state_dict(),
                optimizer=self.opt.state_dict(),
                **meta,
            )
            if path is None:  # the sharded checkpoint of an earlier leg, now behind
                dcp.remove(self.out / checkpoint.SHARDED_NAME)
        distributed.barrier(self.dist)

    def _bytes_per_rank(self) -> dict[str, int]:
        """What rank 0 holds of the weights and AdamW states, all and the experts' alone: a replica
        under DDP, 1/world under FSDP, the experts 1/ep under expert parallelism."""
        experts = [p for m in self.model.modules() if isinstance(m, Experts) for p in (m.w1, m.w2)]

        def states(params):
            return (t for p in params for t in self.opt.state.get(p, {}).values() if torch.is_tensor(t))

        params = list(self.model.parameters())
        return {
            "param_bytes_per_rank": parallel.local_bytes(params),
            "optimizer_bytes_per_rank": parallel.local_bytes(states(params)),
            "expert_param_bytes_per_rank": parallel.local_bytes(experts),
            "expert_optimizer_bytes_per_rank": parallel.local_bytes(states(experts)),
        }

    def _progress(self, start: int):
        """A bar on a terminal, lines every `log_every` steps elsewhere; nothing when quiet or not rank 0."""
        import sys

        if self.quiet or not self.dist.main:
            return None
        if sys.stderr.isatty():
            return BarProgress(self.cfg.steps, start, self.out.name)
        every = self.cfg.log_every or max(1, self.cfg.steps // 20)
        return LineProgress(self.cfg.steps, start, every, self.out.name)

    def _record(
        self,
        status: str,
        train_loss: float,
        val_loss: float | None,
        tokens: int,
        wall: float,
        train_time: float,
        completed: int,
    ):
        cfg, m = self.cfg, self.cfg.model
        trained_here = (completed - self.branched_at) * cfg.tokens_per_step
        moe = m.ffn == "moe"
        return {
            "status": status,
            "total_params": self.counts["total_params"],  # N, paper definition (non-embedding)
            "active_params": self.counts["active_params"],  # N_act
            "tokens": tokens,  # D actually trained
            "granularity": m.granularity if moe else 0,  # 0: dense
            "expansion_rate": m.expansion_rate if moe else 1,
            "ffn": m.ffn,
            "routing": m.routing if moe else None,
            "n_experts": self.counts["n_experts"],
            "d_model": m.d_model,
            "n_blocks": m.n_blocks,
            "flops": self.counts["flops_per_token"] * tokens,  # F, paper model
            "flops_per_token": self.counts["flops_per_token"],
            "train_loss": finite_or_none(train_loss),
            "train_loss_window": cfg.window,
            "val_loss": val_loss,
            "steps": tokens // cfg.tokens_per_step,
            "planned_steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len,
            "wall_time_s": wall,
            "tokens_per_s": trained_here / train_time if train_time > 0 else None,
            "schedule": cfg.schedule,
            # steps taken from a stable run's snapshot (0: trained from scratch)
            "branched_at": self.branched_at,
            "tokens_trained_here": trained_here,
            "exact_params": exact_params(m)["total"],
            "world_size": self.dist.world_size,
            # what rank 0 holds: a replica under DDP, 1/world of it under FSDP
            **self._bytes_per_rank(),
            "device": _device_name(self.device),
            "torch": torch.__version__,
            "out_dir": str(self.out),
            "config": cfg.to_dict(),
        }


def config_diff(saved: dict[str, Any], cfg: TrainConfig, allowed: set[str]) -> list[str]:
    """Keys of a checkpoint's config that differ from `cfg` outside `allowed`; a key the checkpoint's
    version did not know yet counts as its default."""
    now = cfg.to_dict()
    defaults = TrainConfig().to_dict()
    saved = {**defaults, **saved}
    if isinstance(saved.get("model"), dict):  # a model field added since counts as its default too
        saved["model"] = {**defaults["model"], **saved["model"]}
    return sorted(k for k in set(saved) | set(now) if k not in allowed and saved.get(k) != now.get(k))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"
