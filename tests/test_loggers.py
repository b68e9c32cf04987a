"""TensorBoard and W&B logging (`log:`), trained in-process on the tiny model.

The W&B runs are offline with every W&B folder under tmp_path and the server address pointed at a closed
local port, so the tests never reach the network.
"""

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
from _train_fixtures import make_data, read_metrics, tiny_config

from finemoe.errors import ConfigError
from finemoe.sweep.spec import config_hash
from finemoe.train.config import TrainConfig
from finemoe.train.loggers import WANDB_ID_NAME
from finemoe.train.trainer import train

TRAIN_SCALARS = ("loss", "loss_smooth", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'finemoe[log]')")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def _cfg(data, out, **over):
    return TrainConfig.from_dict(
        tiny_config(data, out, steps=6, threads=1, eval_every=3, ckpt_every=3, **over)
    )


def _tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`, what `wandb sync` uploads): a LevelDB-style
    log of 32 KiB blocks after a 7-byte header, each record a 7-byte header (crc, length, kind) and its
    bytes, split across blocks as FIRST/MIDDLE/LAST pieces."""
    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            yield rec


def _wandb_history(path: Path) -> dict[int, dict[str, float]]:
    out = {}
    for rec in _wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out[int(items.get("_step", rec.history.step.num))] = items
    return out


def test_log_option_is_validated_and_stays_out_of_run_ids():
    assert TrainConfig().log == "none"
    assert TrainConfig.from_dict({"log": ["wandb", "none", "wandb"]}).log == "wandb"
    both = TrainConfig.from_dict({"log": ["tensorboard", "wandb"]})
    assert both.log == ("tensorboard", "wandb") and both.to_dict()["log"] == ["tensorboard", "wandb"]
    assert TrainConfig.from_dict(both.to_dict()) == both
    for bad in ("bogus", ["tensorboard", "mlflow"], 3):
        with pytest.raises(ConfigError, match="log must be one of") as err:
            TrainConfig.from_dict({"log": bad})
        assert "\n" not in str(err.value)
    assert config_hash({"tokens": 10, "log": "wandb"}) == config_hash({"tokens": 10})


def test_tensorboard_scalars_and_a_resume_purges_steps_logged_after_the_checkpoint(data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'finemoe[log]')")
    out = tmp_path / "run"
    cfg = _cfg(data, out, log="tensorboard")
    train(cfg.replace(stop_at_step=3), quiet=True)
    saved = tmp_path / "ckpt-at-3.pt"
    shutil.copyfile(out / "ckpt.pt", saved)
    train(cfg, resume=True, quiet=True)
    # a kill after step 6 but before final.json, with the checkpoint of step 3: steps 4-6 run twice
    shutil.copyfile(saved, out / "ckpt.pt")
    (out / "final.json").unlink()
    train(cfg, resume=True, quiet=True)

    assert list((out / "tb").glob("events.out.tfevents.*"))
    tb = _tb_scalars(out / "tb")
    rows = read_metrics(out)
    for key in TRAIN_SCALARS:
        assert [s for s, _ in tb[key]] == [1, 2, 3, 4, 5, 6], key
    assert [s for s, _ in tb["val_loss"]] == [3, 6]
    assert [v for _, v in tb["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "lb_loss" not in tb  # a dense model reports no auxiliary losses


def test_tensorboard_logs_moe_aux_losses(data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'finemoe[log]')")
    moe = {"ffn": "moe", "routing": "tc", "granularity": 2, "expansion_rate": 2}
    cfg = TrainConfig.from_dict(
        tiny_config(data, tmp_path / "run", steps=3, threads=1, log="tensorboard", model=moe)
    )
    train(cfg, quiet=True)
    tb = _tb_scalars(tmp_path / "run" / "tb")
    assert [s for s, _ in tb["lb_loss"]] == [1, 2, 3] and [s for s, _ in tb["imbalance"]] == [1, 2, 3]


def test_wandb_offline_run_and_its_resumption_share_one_run_id(data, tmp_path, offline_wandb):
    out = tmp_path / "run"
    cfg = _cfg(data, out, log=["tensorboard", "wandb"])
    train(cfg.replace(stop_at_step=3), quiet=True)
    run_id = (out / WANDB_ID_NAME).read_text().strip()
    first = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1
    train(cfg, resume=True, quiet=True)
    assert (out / WANDB_ID_NAME).read_text().strip() == run_id
    logs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)

    history = {}
    for path in logs:
        history.update(_wandb_history(path))
    rows = read_metrics(out)
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert [history[s]["loss"] for s in range(1, 7)] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [s for s in history if "val_loss" in history[s]] == [3, 6]
    assert not list(offline_wandb.glob("**/*.wandb"))  # the run lives in its run folder only
    assert list((out / "tb").glob("events.out.tfevents.*"))  # both loggers at once


def test_a_new_run_in_a_used_folder_gets_a_new_wandb_run(data, tmp_path, offline_wandb):
    out = tmp_path / "run"
    (out).mkdir()
    (out / WANDB_ID_NAME).write_text("oldrun\n")
    train(_cfg(data, out, log="wandb").replace(tokens=2 * 4 * 16), quiet=True)
    assert (out / WANDB_ID_NAME).read_text().strip() != "oldrun"


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_fails_before_training_with_the_install_command(
    data, tmp_path, monkeypatch, name, module
):
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"pip install 'finemoe\[log\]'") as err:
        train(_cfg(data, out, log=name), quiet=True)
    assert "\n" not in str(err.value) and f"log: {name}" in str(err.value)
    assert not (out / "metrics.jsonl").exists()
