"""Optional experiment trackers fed from the metrics records: TensorBoard and Weights & Biases.

metrics.jsonl stays the run's own record; these mirror its scalars for people who browse runs in those
tools. Both packages are optional (`pip install 'finemoe[log]'`), so they are imported only when a run
asks for them, and a missing one fails at startup rather than after hours of training.
"""

from __future__ import annotations

import importlib
import math
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from finemoe.errors import ConfigError
from finemoe.io import write_text_atomic

INSTALL_HINT = "pip install 'finemoe[log]'"
# The modules each logger imports; the first is the package pip installs.
MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}
# The metrics records' keys mirrored as scalars (each only when present and finite).
SCALARS = (
    "loss",
    "loss_smooth",
    "val_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "flops_per_s",
    "lb_loss",
    "z_loss",
    "imbalance",
)
TB_DIR = "tb"
WANDB_ID_NAME = "wandb_id.txt"


class Logger(Protocol):
    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def selected(log: str | tuple[str, ...]) -> tuple[str, ...]:
    """The logger names a TrainConfig's `log` asks for ("none" asks for none)."""
    names = (log,) if isinstance(log, str) else tuple(log)
    return tuple(n for n in names if n != "none")


def check_installed(log: str | tuple[str, ...]) -> None:
    """Import what the chosen loggers need, on every rank before any work, so a missing package is a
    one-line ConfigError with the install command rather than a crash (or a hang) mid-run."""
    for name in selected(log):
        for module in MODULES[name]:
            try:
                importlib.import_module(module)
            except ImportError as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(
                    f"log: {name} needs the {MODULES[name][0]} package, which could not be imported "
                    f"({why}); install it with {INSTALL_HINT}"
                ) from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key in SCALARS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    """Event files in `<out_dir>/tb/`. A resumed run purges the steps a killed run logged after its
    checkpoint (TensorBoard's purge_step), as metrics.jsonl drops them, so no step shows twice."""

    def __init__(self, out: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / TB_DIR), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run in `<out_dir>/wandb/`, offline unless WANDB_MODE says otherwise, so training never needs
    the network (`wandb sync` uploads it later). The run id is kept in the run folder, so a resumed run
    continues the same W&B run."""

    def __init__(self, config: dict[str, Any], out: Path, resume_step: int | None):
        import wandb

        id_path = out / WANDB_ID_NAME
        run_id = id_path.read_text().strip() if resume_step and id_path.is_file() else ""
        if not run_id:  # a new run, or one resumed before its first checkpoint: it starts over
            run_id = secrets.token_hex(4)
            write_text_atomic(id_path, run_id + "\n")
        mode = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "finemoe",
                dir=str(out),
                name=out.name,
                config=config,
                id=run_id,
                resume="allow",
                **mode,
            )
        except Exception as e:  # no login while online, a bad WANDB_MODE, ...: say so in one line
            why = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(
                f"W&B could not start a run ({type(e).__name__}: {why}); log in with `wandb login` or "
                "set WANDB_MODE=offline"
            ) from None

    def log(self, step: int, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """All the loggers a run asked for, behind one log/close."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, step: int, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_loggers(
    log: str | tuple[str, ...], config: dict[str, Any], out: Path, resume_step: int | None
) -> Loggers:
    """Rank 0's loggers for the run in `out`; `resume_step` is the checkpoint's step when resuming."""
    opened: list[Logger] = []
    try:
        for name in selected(log):
            if name == "tensorboard":
                opened.append(TensorBoardLogger(out, resume_step))
            else:
                opened.append(WandbLogger(config, out, resume_step))
    except BaseException:
        Loggers(opened).close()
        raise
    return Loggers(opened)
