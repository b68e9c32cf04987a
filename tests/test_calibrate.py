"""`finemoe bench calibrate`: the cost model recovers known costs, and the command measures a grid and
writes a calibration with its held-out error (a smoke test on a tiny grid: timings are not asserted)."""

import json

import numpy as np
import pytest
import torch

from finemoe.benchmarks import calibrate as bench
from finemoe.cli import main
from finemoe.scaling.cost_model import TERMS, BlockShape, calibrate, fit, predict


def _shapes():
    rng = np.random.default_rng(0)
    out = []
    for d in (64, 128, 256):
        for G in (0, 1, 4, 16, 64):
            E = 8 if G else 0
            out.append(
                BlockShape(
                    d_model=d,
                    flops_per_token=float(24 * d * d * (1 + rng.random())),
                    slots_per_token=float(G),
                    n_experts=E * G,
                    params=int(12 * d * d * (E or 1)),
                    tokens_per_step=int(rng.choice([1024, 4096])),
                )
            )
    return out


def test_the_fit_recovers_known_costs_and_predicts_held_out_blocks():
    theta = dict(zip(TERMS, [5e-11, 2e-9, 3e-7, 4e-9, 1e-8, 2e-4]))
    shapes = _shapes()
    times = [predict(theta, s) for s in shapes]
    got = fit(shapes, times)
    for k in TERMS:
        assert got[k] == pytest.approx(theta[k], rel=1e-4)
    points = [{**s.__dict__, "seconds_per_token": t} for s, t in zip(shapes, times)]
    cal = calibrate(points)
    assert cal["holdout_error"] < 1e-6 and cal["holdout_points"] == 4
    # a model that cannot explain the times shows it in the held-out error
    noisy = [
        {**p, "seconds_per_token": p["seconds_per_token"] * (2.0 if i % 2 else 0.5)}
        for i, p in enumerate(points)
    ]
    assert calibrate(noisy)["holdout_error"] > 0.3


def test_calibrate_command_writes_a_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        bench, "QUICK", {"d_model": [32], "granularity": [1, 4], "expansion_rate": [2], "batch": 2, "seq": 16}
    )
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "bench",
                    "calibrate",
                    "--quick",
                    "--out",
                    str(tmp_path / "c.json"),
                    "--json",
                    "--repeats",
                    "1",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "c.json").read_text())
    assert set(saved["coefficients"]) == set(TERMS) and out["holdout_points"] == 1
    assert [(p["granularity"], p["n_experts"]) for p in saved["points"]] == [(0, 0), (1, 2), (4, 8)]
    assert all(p["seconds_per_token"] > 0 for p in saved["points"])
    assert saved["holdout_error"] is not None and saved["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_calibrate_refuses_bad_input(tmp_path, capsys):
    assert main(["bench", "calibrate", "--out", str(tmp_path / "c.json"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    assert main(["bench", "calibrate", "--out", str(tmp_path / "dir")]) == 2
