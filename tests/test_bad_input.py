"""Bad input, command by command: exit code 2, one line on stderr naming the problem, no traceback, and
no file created or changed. Every case runs in a folder of ready fixtures that is compared before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml
from _train_fixtures import ROOT, TINY_MODEL, make_data

from finemoe.cli import main

MINI_CSV = ROOT / "experiments" / "mini" / "results.csv"


def _train_config(**over) -> dict:
    cfg = {
        "data_dir": "data",
        "out_dir": "runs/x",
        "tokens": 4 * 4 * 16,
        "batch_size": 4,
        "lr": 3e-3,
        "eval_batches": 1,
        "threads": 1,
        "model": dict(TINY_MODEL),
    }
    for k, v in over.items():
        if k.startswith("model."):
            cfg["model"][k[6:]] = v
        else:
            cfg[k] = v
    return cfg


def _spec(**over) -> dict:
    spec = {
        "name": "s",
        "data_dir": "data",
        "runs_dir": "runs/s",
        "model": {"vocab_size": 64, "seq_len": 16, "expansion_rate": 4},
        "sizes": [{"d_model": 32, "n_blocks": 1, "head_dim": 16}],
        "granularities": [1, 2],
        "tokens": [1024],
        "dense": True,
        "executor": {"kind": "inprocess"},
    }
    spec.update(over)
    return spec


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    """The fixtures every case may point at: data, configs, specs, results, stores, a finished run."""
    root = tmp_path_factory.mktemp("bad")
    make_data(root / "data")
    (root / "folder").mkdir()
    (root / "afile").write_text("not a folder\n")
    (root / "nonutf8.txt").write_bytes(b"name: \xff\xfe broken\n")
    shutil.copy(MINI_CSV, root / "results.csv")
    rows = (root / "results.csv").read_text().splitlines()
    head, first = rows[0], rows[1]
    col = head.split(",").index("train_loss")
    cells = first.split(",")
    cells[col] = str(float(cells[col]) + 0.5)
    (root / "dup.csv").write_text("\n".join([head, first, ",".join(cells)]) + "\n")
    con = sqlite3.connect(root / "foreign.sqlite")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    (root / "empty.sqlite").write_bytes(b"")
    (root / "good.yaml").write_text(yaml.safe_dump(_train_config()))
    for name, over in {
        "seed_neg": {"seed": -1},
        "seed_huge": {"seed": 10**20},
        "head_dim0": {"model.head_dim": 0},
        "init_neg": {"model.init_scale": -0.1},
        "cap_inf": {"model.capacity_factor": float("inf")},
        "vocab_huge": {"model.vocab_size": 10**12},
        "dmodel_list": {"model.d_model": [64]},
        "outdir_list": {"out_dir": ["a", "b"]},
        "g_frac": {"model.ffn": "moe", "model.granularity": 2.7},
        "batch_bool": {"batch_size": True},
        "eps_inf": {"eps": float("inf")},
        "lr_nan": {"lr": float("nan")},
        "schedule_bad": {"schedule": "step"},
        "cooldown_zero": {"schedule": "wsd", "cooldown_fraction": 0},
        "unknown_key": {"colour": "blue"},
        "model_text": {"model": "big"},
        "tokens_tiny": {"tokens": 1},
        "warmup_long": {"schedule": "wsd", "warmup_tokens": 4 * 16 * 4},
        "snap_late": {"snapshot_steps": [100]},
        "grad_clip_neg": {"grad_clip": -1},
        "device_bad": {"device": "tpu"},
        "threads_zero": {"threads": 0},
    }.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(_train_config(**over)))
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "invalid.yaml").write_text("a: [1, 2\n")
    for name, over in {
        "model_text": {"model": "x"},
        "train_list": {"train": [1, 2]},
        "executor_text": {"executor": "local"},
        "executor_kind": {"executor": {"kind": "cloud"}},
        "tokens_text": {"tokens": ["lots"]},
        "g_frac": {"granularities": [2.7]},
        "seeds_text": {"seeds": ["a"]},
        "dense_text": {"dense": "yes"},
        "sizes_text": {"sizes": "big"},
        "sizes_num": {"sizes": [1]},
        "data_dir_list": {"data_dir": ["a"]},
        "both_budgets": {
            "sizes": [{"d_model": 32, "n_blocks": 1, "head_dim": 16, "tokens": [1024], "budgets": [1e9]}]
        },
        "branches_cosine": {"branches": True},
        "workers_zero": {"executor": {"kind": "local", "workers": 0}},
        "train_sets_tokens": {"train": {"tokens": 5}},
        "budget_text": {"tokens": None, "budgets": ["big"]},
    }.items():
        (root / f"spec_{name}.yaml").write_text(yaml.safe_dump(_spec(**over)))
    (root / "spec_ok.yaml").write_text(yaml.safe_dump(_spec()))
    (root / "broken_model").mkdir()
    (root / "broken_model" / "config.json").write_text('{"d_model": ')
    (root / "broken_model" / "model.safetensors").write_bytes(b"not weights")
    (root / "coeffs.json").write_text(
        json.dumps(
            {
                "name": "c",
                "moe": {
                    "a": 18.1,
                    "alpha": 0.115,
                    "b": 30.8,
                    "beta": 0.147,
                    "g": 2.1,
                    "gamma": 0.58,
                    "c": 0.47,
                },
            }
        )
    )
    (root / "coeffs_bad.json").write_text(
        json.dumps({"moe": {"a": -1, "alpha": 0.1, "b": 1, "beta": 0.1, "g": 1, "gamma": 0.5, "c": 1}})
    )
    assert (
        main(
            [
                "train",
                str(root / "good.yaml"),
                f"data_dir={root / 'data'}",
                f"out_dir={root / 'runs/done'}",
                "--quiet",
            ]
        )
        == 0
    )
    return root


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


CASES = [
    # train: values that used to pass validation and crash later, coercions, unreadable files
    ("train seed_neg.yaml", "seed must be between 0 and 2**32 - 1"),
    ("train seed_huge.yaml", "seed must be between 0 and 2**32 - 1"),
    ("train head_dim0.yaml", "head_dim must be >= 1"),
    ("train init_neg.yaml", "init_scale must be > 0"),
    ("train cap_inf.yaml", "capacity_factor must be a finite number"),
    ("train vocab_huge.yaml", "vocab_size must be at most"),
    ("train dmodel_list.yaml", "model.d_model must be an integer"),
    ("train outdir_list.yaml", "train.out_dir must be a text"),
    ("train g_frac.yaml", "model.granularity must be an integer"),
    ("train batch_bool.yaml", "train.batch_size must be an integer, got True"),
    ("train eps_inf.yaml", "train.eps must be a finite number"),
    ("train lr_nan.yaml", "train.lr must be a finite number"),
    ("train schedule_bad.yaml", "schedule must be one of"),
    ("train cooldown_zero.yaml", "cooldown_fraction must be in (0, 1]"),
    ("train unknown_key.yaml", "unknown training key(s) ['colour']"),
    ("train model_text.yaml", "model must be a mapping"),
    ("train tokens_tiny.yaml", "less than one step"),
    ("train warmup_long.yaml", "runs into the cooldown"),
    ("train snap_late.yaml", "snapshot_steps must be whole steps"),
    ("train grad_clip_neg.yaml", "grad_clip must be > 0"),
    ("train device_bad.yaml", "device must be one of"),
    ("train threads_zero.yaml", "threads must be >= 1"),
    ("train list.yaml", "must hold a mapping"),
    ("train invalid.yaml", "is not valid YAML"),
    ("train nonutf8.txt", "is not UTF-8 text"),
    ("train missing.yaml", "not found"),
    ("train good.yaml model.d_model=abc", "model.d_model must be an integer"),
    ("train good.yaml nokey", "must look like key=value"),
    (
        "train good.yaml out_dir=runs/done lr=0.01 --resume",
        "holds a finished run of a different config (lr differ)",
    ),
    ("train good.yaml out_dir=runs/done", "already holds a run"),
    # sweep specs: wrong types anywhere, unknown executors, before any store exists
    ("sweep run spec_model_text.yaml", "'model' must be a mapping"),
    ("sweep run spec_train_list.yaml", "'train' must be a mapping"),
    ("sweep run spec_executor_text.yaml", "'executor' must be a mapping"),
    ("sweep run spec_executor_kind.yaml", "unknown executor 'cloud'"),
    ("sweep run spec_tokens_text.yaml", "must be a number, got 'lots'"),
    ("sweep run spec_g_frac.yaml", "must be whole numbers, got 2.7"),
    ("sweep run spec_seeds_text.yaml", "seeds must be whole numbers"),
    ("sweep run spec_dense_text.yaml", "'dense' must be true or false"),
    ("sweep run spec_sizes_text.yaml", "'sizes' must be a non-empty list"),
    ("sweep run spec_sizes_num.yaml", "sizes[0] must be a mapping"),
    ("sweep run spec_data_dir_list.yaml", "'data_dir' must be a text"),
    ("sweep run spec_both_budgets.yaml", "both token budgets and compute budgets"),
    ("sweep run spec_branches_cosine.yaml", "needs train: {schedule: wsd}"),
    ("sweep run spec_workers_zero.yaml", "executor.workers must be >= 1"),
    ("sweep run spec_train_sets_tokens.yaml", "'train.tokens' is set by the sweep"),
    ("sweep run spec_budget_text.yaml", "must be a number, got 'big'"),
    ("sweep run nonutf8.txt", "is not UTF-8 text"),
    ("sweep run nope/quickstart.yaml", "not found"),
    ("sweep run spec_dense_text.yaml --workers 0", "expected a positive integer"),
    ("sweep status nope/quickstart.yaml", "not found"),
    ("sweep status --store foreign.sqlite", "is not a finemoe results store"),
    ("sweep status --store empty.sqlite", "is not a finemoe results store"),
    ("sweep status --store missing.sqlite", "not found"),
    ("sweep export --store foreign.sqlite --csv out.csv", "is not a finemoe results store"),
    ("sweep export --store foreign.sqlite --csv folder", "is a folder"),
    ("sweep run spec_model_text.yaml --store foreign.sqlite", "'model' must be a mapping"),
    # plan and savings: budgets and costs the planner cannot answer, outputs that cannot be written
    ("plan --flops 1e300", "beyond 1e+35"),
    ("savings --flops 1e300", "beyond 1e+35"),
    ("plan --flops 10", "cannot train even one token"),
    ("savings --flops 10", "cannot train even one token"),
    ("plan --flops 1e20 --c-r nan", "expected a finite number >= 0"),
    ("savings --flops 1e20 --c-r inf", "expected a finite number >= 0"),
    ("plan --flops -5", "expected a positive finite number"),
    ("plan --flops 1e20 --granularities a,b", "--granularities must be comma-separated numbers"),
    ("plan --flops 1e20 --plot folder", "is a folder"),
    ("savings --flops 1e20 --plot folder", "is a folder"),
    ("plan --flops 1e20 --write-config folder", "is a folder"),
    ("plan --paper-table --write-config x.yaml", "does not apply to --paper-table"),
    ("plan --flops 1e20 --coefficients nonutf8.txt", "cannot read JSON"),
    ("plan --flops 1e20 --coefficients missing.json", "not a published set"),
    ("plan --flops 1e20 --coefficients coeffs_bad.json", "must be finite and non-negative"),
    ("savings --flops 1e20 --coefficients coeffs.json", "have no dense law"),
    # fit: ambiguous data, impossible holdouts, unwritable outputs
    ("fit dup.csv", "appears twice with different results"),
    ("fit results.csv --fix alpha", "write NAME=VALUE"),
    ("fit results.csv --prior bogus", "invalid choice"),
    ("fit results.csv --out folder", "is a folder"),
    ("fit results.csv --plot folder", "is a folder"),
    ("fit results.csv --law dense", "pass --holdout-best 0"),
    ("fit results.csv --holdout-budget", "needs an iso-FLOP sweep"),
    ("fit nonutf8.txt", "neither a SQLite store nor a readable CSV"),
    ("fit foreign.sqlite", "has no readable 'runs' table"),
    ("fit results.csv --bootstrap -1", "--bootstrap must be >= 0"),
    ("fit results.csv --law granularity --prior paper", "apply to the moe and dense laws"),
    # report and quickstart: checked before anything is written
    ("report results.csv --out rep --coefficients bogus", "not a published set"),
    ("report results.csv --out rep --discussion nonutf8.txt", "is not UTF-8 text"),
    ("report results.csv --out afile", "is a file"),
    ("report results.csv --out rep --bootstrap -1", "--bootstrap must be >= 0"),
    ("report missing.csv --out rep", "not found"),
    ("quickstart --out afile --spec spec_ok.yaml", "report folder afile is a file"),
    ("quickstart --spec spec_dense_text.yaml", "'dense' must be true or false"),
    ("quickstart --bootstrap -1", "--bootstrap must be >= 0"),
    # the rest
    ("generate runs/missing --prompt hi", "not found"),
    ("generate broken_model --prompt hi", "is not a readable finemoe model folder"),
    ("generate runs/done --prompt \udcff", "not UTF-8"),
    ("generate runs/done --prompt hi --temperature inf", "expected a finite number >= 0"),
    ("params --d-model 0 --n-blocks 2", "expected a positive integer"),
    ("params --d-model 64 --n-blocks 2 --granularity 3", "must divide"),
    ("data prepare --out afile", "is not a finemoe data folder"),
    ("bench moe-layer --d-model 0", "expected a positive integer"),
    ("export runs/missing --hf out_hf", "holds no finished model"),
    ("export broken_model --hf out_hf", "is not a readable finemoe model folder"),
    ("export runs/done --hf afile", "not an empty folder"),
    ("bench calibrate --out folder", "is a folder"),
    ("plan --flops 1e20 --calibration folder", "not a calibration"),
    ("train good.yaml parallel.ep=3", "parallel.ep=3 must divide"),
    ("train good.yaml micro_batch_size=3", "micro_batch_size must divide"),
    ("plot-run folder", "metrics.jsonl not found"),
    ("plot-run runs/done --out folder", "is a folder"),
]


@pytest.mark.parametrize("argv,msg", CASES, ids=[a for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(ready, monkeypatch, capsys, argv, msg):
    monkeypatch.chdir(ready)
    before = _tree(ready)
    try:
        code = main(argv.split(" "))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert msg in lines[0], lines[0]
    assert _tree(ready) == before  # nothing new, nothing changed


def test_the_table_covers_every_command():
    from finemoe.cli import COMMANDS

    assert len(CASES) >= 60
    assert {a.split(" ")[0] for a, _ in CASES} == set(COMMANDS)
