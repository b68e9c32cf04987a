"""The public Python API: the same answers as the CLI, from the same library."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from _train_fixtures import make_data, tiny_config

import finemoe
from finemoe.cli import main

MINI = Path(__file__).resolve().parents[1] / "experiments" / "mini" / "results.csv"


def test_import_finemoe_loads_no_torch():
    code = "import sys, finemoe; finemoe.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False" and finemoe.__all__[:5] == ["plan", "fit", "results", "load", "train"]


def test_plan_is_the_cli_json(capsys):
    assert main(["plan", "--flops", "1e20", "--expansion-rate", "16", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = json.loads(json.dumps(finemoe.plan(1e20, expansion_rate=16)))
    assert api == cli


def test_fit_from_a_path_or_a_dataframe(capsys):
    by_path = finemoe.fit(MINI, "moe", prior="paper")
    by_frame = finemoe.fit(finemoe.results(MINI), "moe", prior="paper")
    assert by_path.params == by_frame.params and by_path.fixed == {
        "gamma": 0.58,
        "alpha": 0.115,
        "beta": 0.147,
    }
    assert main(["fit", str(MINI), "--prior", "paper", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["coefficients"] == by_path.params


def test_train_then_load_in_eval_mode(tmp_path):
    import finemoe.train.config  # noqa: F401 (the subpackage imported first: finemoe.train stays callable)

    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", steps=6, threads=1)
    threads = torch.get_num_threads()
    try:
        record = finemoe.train(cfg, eval_batches=1, model__n_blocks=1)
    finally:
        torch.set_num_threads(threads)
    assert record["status"] == "done" and record["n_blocks"] == 1
    again = finemoe.train(cfg, val_file=None, out_dir=str(tmp_path / "noval"), model__n_blocks=1)
    assert again["val_loss"] is None  # a value given as it is, not read back as text
    for where in (tmp_path / "run", tmp_path / "run" / "model", tmp_path / "run" / "ckpt.pt"):
        model = finemoe.load(where)
        assert not model.training and model.cfg.n_blocks == 1
    x = torch.randint(0, 64, (1, 8))
    a, b = (
        finemoe.load(tmp_path / "run").forward(x).logits,
        finemoe.load(tmp_path / "run" / "ckpt.pt")(x).logits,
    )
    torch.testing.assert_close(a, b)
