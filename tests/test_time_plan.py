"""Planning under wall-clock time with a calibrated cost model: the FLOPs model's G when a token costs
its matmul FLOPs, a smaller G when routed slots cost real time."""

import pytest

from finemoe.errors import ConfigError
from finemoe.scaling import time_plan
from finemoe.scaling.cost_model import TERMS
from finemoe.scaling.laws import load_coefficients
from finemoe.scaling.plan import Settings, optimum
from finemoe.scaling.time_plan import compare, time_optimum

LAW = load_coefficients("paper").moe
FLOP_ONLY = dict.fromkeys(TERMS, 0.0) | {"flop": 1e-15}
SETTINGS = Settings(expansion_rate=64, c_r=6.0)  # the router's matmul alone, as the cost model counts it


def test_time_priced_by_flops_gives_the_flops_optimum(monkeypatch):
    monkeypatch.setattr(time_plan, "SEQ_LEN", 0)  # attention scores: FLOPs the FLOPs model leaves out
    for flops in (1e19, 1e22):
        r = compare(LAW, FLOP_ONLY, SETTINGS, flops=flops)
        assert r["granularity"] == r["flops_optimal_granularity"] == optimum(LAW, flops, SETTINGS).granularity
        assert r["time_saving"] == pytest.approx(1.0, abs=0.02)


def test_costly_routed_slots_lower_the_time_optimal_granularity():
    slow_slots = FLOP_ONLY | {"slot": 2e-12}
    r = compare(LAW, slow_slots, SETTINGS, flops=1e21)
    assert r["granularity"] < r["flops_optimal_granularity"]
    assert r["time_optimal"]["loss"] < r["flops_optimal"]["loss"]  # better in the same wall-clock
    assert r["time_saving"] > 1.0
    assert "time-optimal G is" in r["why"]
    # a time budget gives the same answer as the FLOPs budget whose optimal run takes that long
    again = compare(LAW, slow_slots, SETTINGS, seconds=r["seconds"])
    assert again["granularity"] == r["granularity"]
    assert again["flops_optimal_granularity"] == r["flops_optimal_granularity"]


def test_bad_budgets_are_refused():
    with pytest.raises(ConfigError, match="positive number of seconds"):
        time_optimum(LAW, FLOP_ONLY, -1.0, SETTINGS)
    with pytest.raises(ConfigError, match="FLOPs budget or a time budget"):
        compare(LAW, FLOP_ONLY, SETTINGS)


def test_cli_plans_for_wall_clock_time(tmp_path):
    import json

    from _train_fixtures import cli

    cal = tmp_path / "calib.json"
    cal.write_text(
        json.dumps({"coefficients": FLOP_ONLY | {"slot": 1e-11}, "device": "cpu", "holdout_error": 0.1})
    )
    r = cli("plan", "--flops", "1e21", "--calibration", str(cal), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (
        out["granularity"] < out["flops_optimal_granularity"] and out["calibration"]["holdout_error"] == 0.1
    )
    r = cli("plan", "--hours", "1000", "--devices", "8", "--calibration", str(cal), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["seconds"] == pytest.approx(1000 * 3600 * 8)
    human = cli("plan", "--flops", "1e21", "--calibration", str(cal))
    assert "time-optimal" in human.stdout and "why:" in human.stdout
    cal.write_text(json.dumps({"coefficients": {"flop": -1}}))
    for args, why in [
        (("--hours", "5"), "give --calibration"),
        (("--flops", "1e21", "--calibration", str(cal)), "not a calibration"),
        (("--flops", "1e21", "--calibration", str(tmp_path / "none.json")), "not found"),
    ]:
        r = cli("plan", *args)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
