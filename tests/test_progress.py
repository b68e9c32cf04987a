"""Progress off a terminal: plain lines with an ETA from the trainer, and an ETA from sweeps."""

import io

import torch
from _train_fixtures import make_data, tiny_config

from finemoe.train.config import TrainConfig
from finemoe.train.progress import LineProgress, duration
from finemoe.train.trainer import train


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 45, 760, 11100)] == ["0s", "45s", "12m40s", "3h05m"]


def test_a_line_every_n_steps_and_at_the_end():
    out = io.StringIO()
    p = LineProgress(total=10, start=0, every=4, name="run", stream=out)
    for step in range(1, 11):
        p.step(step, {"loss_smooth": 5.0 - step / 10, "tokens_per_s": 1234.0})
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["run: step 4/10", "run: step 8/10", "run: step 10/10"]
    assert lines[0].endswith("1,234 tokens/s  ETA 0s") and "loss 4.6000" in lines[0]


def test_the_trainer_prints_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    cfg = TrainConfig.from_dict(tiny_config(data, tmp_path / "run", steps=6, threads=1, log_every=2))
    threads = torch.get_num_threads()
    try:
        train(cfg)  # not quiet; pytest's captured stderr is no terminal
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[0] for line in err if line.startswith("run: ")] == [
        "run: step 2/6",
        "run: step 4/6",
        "run: step 6/6",
    ]


def test_a_sweep_says_how_long_it_has_left(tmp_path, monkeypatch):
    from pathlib import Path

    from finemoe.sweep import spec as specmod
    from finemoe.sweep.driver import run_sweep

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = specmod.expand(
        {
            "name": "t",
            "data_dir": str(tmp_path),
            "runs_dir": str(tmp_path / "runs"),
            "model": {"vocab_size": 64, "seq_len": 8, "expansion_rate": 4},
            "sizes": [{"d_model": 64, "n_blocks": 1}],
            "granularities": [1, 2],
            "tokens": [1000],
            "trainer": "sweep_fake_trainer:fake_train",
            "executor": {"kind": "inprocess"},
        }
    )
    lines = []
    run_sweep(spec, log=lines.append)
    done = [line for line in lines if line.startswith("[")]
    assert "ETA " in done[0] and "ETA" not in done[-1] and len(done) == 2
