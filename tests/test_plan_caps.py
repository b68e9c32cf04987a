"""Size caps on the planner: total parameters (memory) and active parameters (inference cost)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from finemoe import accounting as acc
from finemoe.cli import main
from finemoe.errors import ConfigError
from finemoe.scaling import plan as P
from finemoe.scaling.laws import load_coefficients

PAPER = load_coefficients("paper")
F = 1e21


def test_a_loose_cap_changes_nothing():
    free = P.optimum(PAPER.moe, F)
    capped = P.optimum(PAPER.moe, F, P.Settings(max_total_params=10 * free.total_params))
    assert capped.loss == pytest.approx(free.loss, abs=1e-9) and not capped.at_cap and not free.at_cap


@pytest.mark.parametrize(
    "cap, field", [("max_total_params", "total_params"), ("max_active_params", "active_params")]
)
def test_a_binding_cap_is_met_exactly_and_spends_the_budget_on_tokens(cap, field):
    free = P.optimum(PAPER.moe, F)
    limit = getattr(free, field) / 5
    p = P.optimum(PAPER.moe, F, P.Settings(**{cap: limit}))
    assert getattr(p, field) == pytest.approx(limit, rel=1e-6) and p.at_cap
    assert p.loss > free.loss and p.tokens > free.tokens
    assert acc.training_flops(p.d_model, p.n_blocks, p.tokens, 64, p.granularity) == pytest.approx(
        F, rel=1e-9
    )


def test_capped_optimum_is_the_best_model_under_the_cap():
    """The clipped 1-D search equals a brute-force scan of every d_model under the cap (convexity)."""
    s = P.Settings(max_total_params=5e9)
    G = 16
    p = P.optimum_for_g(PAPER.moe, F, G, s)
    d_cap = acc.d_model_for_total(5e9, 64)
    best = math.inf
    for d in np.geomspace(16, d_cap, 4000):
        n = acc.n_blocks_for(d)
        N, D = acc.total_params(d, n, 64), acc.tokens_for_flops(F, d, n, 64, G)
        best = min(best, float(PAPER.moe.loss(N, D, G)))
    assert p.loss == pytest.approx(best, abs=1e-9)


def test_every_model_compared_is_held_to_the_same_caps():
    s = P.Settings(max_total_params=20e9)
    c = P.compare(PAPER, F, s)
    free = P.compare(PAPER, F)
    assert c.moe.total_params <= 20e9 * (1 + 1e-9) and c.g1.total_params <= 20e9 * (1 + 1e-9)
    assert c.moe.at_cap and c.g1.at_cap
    assert not c.dense.at_cap and c.dense.loss == pytest.approx(free.dense.loss)  # dense needs less memory
    # under a memory cap the G=1 MoE falls further behind (it cannot grow either) and dense less so
    assert c.g1_flops_multiple > free.g1_flops_multiple and c.dense_flops_multiple < free.dense_flops_multiple


def test_unreachable_under_the_cap_is_inf():
    """Capped at 100M active params, dense cannot get below c + a/N^alpha however many tokens it sees."""
    c = P.compare(PAPER, 1e26, P.Settings(max_active_params=1e8))
    assert c.dense.at_cap and c.dense_flops_multiple == math.inf


@pytest.mark.parametrize("cap", [20e9, 1e9])
def test_architecture_stays_under_the_cap_and_uses_most_of_it(cap):
    s = P.Settings(max_total_params=cap)
    p = P.optimum(PAPER.moe, F, s)
    a = P.architecture(PAPER.moe, p, s)
    assert 0.9 * cap <= a.total_params <= cap and 0.99 * F < a.flops <= F
    assert a.loss - p.loss < 0.01  # the rounding costs little of what the cap allows


def test_caps_validated():
    with pytest.raises(ConfigError, match="max_total_params must be a positive"):
        P.Settings(max_total_params=0)
    with pytest.raises(ConfigError, match="size cap too small"):
        P.optimum(PAPER.moe, F, P.Settings(max_active_params=1e-3))
    s = replace(P.Settings(granularities=(16,)), max_total_params=1e6)
    with pytest.raises(ConfigError, match="no buildable G=16 model"):
        P.architecture(PAPER.moe, P.optimum(PAPER.moe, F, s), s)


def test_cli_plan_and_savings_with_caps(capsys):
    assert main(["plan", "--flops", "1e21", "--max-total-params", "20e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["max_total_params"] == 20e9 and out["at_cap"] and out["g1"]["at_cap"]
    assert out["architecture"]["total_params"] <= 20e9
    assert main(["plan", "--flops", "1e21", "--max-total-params", "20e9"]) == 0
    assert "size caps            N <= 20B (binding for MoE, G=1)" in capsys.readouterr().out
    assert main(["savings", "--flops", "1e26", "--max-active-params", "1e8", "--json"]) == 0
    text = capsys.readouterr().out
    row = json.loads(text)["rows"][0]
    assert row["dense_flops_multiple"] is None and "Infinity" not in text  # strict JSON: null, not Infinity
    assert main(["savings", "--flops", "1e26", "--max-active-params", "1e8"]) == 0
    assert "never" in capsys.readouterr().out


def test_cli_paper_table_refuses_caps(capsys):
    assert main(["plan", "--paper-table", "--max-total-params", "1e9"]) == 2
    assert "no size caps" in capsys.readouterr().err
