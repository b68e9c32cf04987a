"""A test double of the trainer contract (config dict, resume) -> final record, for executor mechanics.

It checkpoints after every step (a JSON file, atomically), sleeps `FAKE_STEP_S` per step so a test can
kill it mid-run, logs every start to `starts.log` (fresh or resumed at step k), and derives its loss
from the config, so a test can tell a redone or corrupted run from a clean one. d_model 40 diverges,
d_model 48 raises.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from finemoe.accounting import active_params, flops_per_token, total_params
from finemoe.io import write_json_atomic

STEPS = 6


def expected_loss(config: dict) -> float:
    m = config["model"]
    g = m["granularity"] if m["ffn"] == "moe" else 0
    return round(2.0 + 50.0 / m["d_model"] + 1e5 / config["tokens"] + 0.1 / (1 + g), 6)


def fake_train(config: dict, resume: bool) -> dict:
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    step = json.loads(ckpt.read_text())["step"] if resume and ckpt.is_file() else 0
    with open(out / "starts.log", "a") as f:
        f.write(f"{'resume' if resume else 'fresh'} {step}\n")
    m = config["model"]
    if m["d_model"] == 48:
        raise RuntimeError("fake trainer: simulated crash")
    step_s = float(os.environ.get("FAKE_STEP_S", "0"))
    while step < STEPS:
        time.sleep(step_s)
        step += 1
        write_json_atomic(ckpt, {"step": step})
    moe = m["ffn"] == "moe"
    e, g = (m["expansion_rate"], m["granularity"]) if moe else (1, 0)
    diverged = m["d_model"] == 40
    record = {
        "status": "diverged" if diverged else "done",
        "error": "loss became nan at step 3" if diverged else None,
        "total_params": total_params(m["d_model"], m["n_blocks"], e),
        "active_params": active_params(m["d_model"], m["n_blocks"]),
        "tokens": config["tokens"],
        "granularity": g,
        "expansion_rate": e,
        "ffn": m["ffn"],
        "d_model": m["d_model"],
        "n_blocks": m["n_blocks"],
        "flops": flops_per_token(m["d_model"], m["n_blocks"], e, g) * config["tokens"],
        "train_loss": math.nan if diverged else expected_loss(config),
        "val_loss": math.nan if diverged else expected_loss(config) + 0.01,
        "wall_time_s": step_s * STEPS,
        "tokens_per_s": 1.0,
        "steps": STEPS,
        "device": "cpu",
    }
    write_json_atomic(out / "final.json", record)
    return record
