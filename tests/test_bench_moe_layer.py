"""Smoke test of `finemoe bench moe-layer` at a tiny shape: JSON structure and sane ratios."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_WAIT", "GLIBC_TUN"))
    }  # exercise the re-exec
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "finemoe", "bench", "moe-layer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_bench_json_structure_and_positive_ratios():
    p = _run(
        "--json", "-G", "1", "2", "--d-model", "32", "-E", "2", "--batch", "4", "--seq", "8", "--repeats", "2"
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert set(out["ratios"]) == {"ec", "tc"}
    for r in ("ec", "tc"):
        assert set(out["ratios"][r]) == {"1", "2"}
        assert all(math.isfinite(v) and v > 0 for v in out["ratios"][r].values())
        assert set(out["ms"][r]) == {"1", "2"}
        assert all(v >= 0 for v in out["page_faults_per_step"][r].values())
        for g, (lo, hi) in out["ratio_p25_p75"][r].items():  # the median paired ratio lies in its spread
            assert lo <= out["ratios"][r][g] <= hi
        # router fwd 2*d*E*G per token over the FFN's 4*d*d_ff: 1 + E*G / (2*4*32)
        assert out["matmul_floor"][r] == pytest.approx({"1": 1 + 2 / 256, "2": 1 + 4 / 256})
    assert set(out["ms"]["dense"]) == {"1", "2"} and out["threads"] >= 1 and out["device"] == "cpu"
    assert out["allocator"]["MALLOC_MMAP_THRESHOLD_"] is not None  # re-executed with tuned malloc
    assert out["allocator"]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert out["omp_wait_policy"] == "PASSIVE"  # and sleeping OpenMP workers
    assert out["cpu_matmul"] == "mkl"


def test_bench_on_the_onednn_linear_path_with_breakdown():
    p = _run(
        "--json",
        "-G",
        "2",
        "--d-model",
        "32",
        "-E",
        "2",
        "--batch",
        "4",
        "--seq",
        "8",
        "--repeats",
        "1",
        "--routing",
        "ec",
        "--threads",
        "2",
        "--cpu-matmul",
        "onednn",
        "--breakdown",
    )
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["cpu_matmul"] == "onednn" and math.isfinite(out["ratios"]["ec"]["2"])
    split = out["breakdown_ms"]
    assert set(split) == {"dense", "ec"} and all(set(per_g) == {"2"} for per_g in split.values())
    dense, ec = split["dense"]["2"], split["ec"]["2"]
    assert all(v >= 0 for v in [*dense.values(), *ec.values()])
    assert dense["expert matmuls"] == 0 and dense["other matmuls"] > 0 and dense["gather/combine"] == 0
    assert ec["expert matmuls"] > 0 and ec["other matmuls"] > 0 and ec["gather/combine"] > 0


def test_bench_breakdown_table():
    p = _run(
        "-G", "2", "--d-model", "32", "-E", "2", "--batch", "4", "--seq", "8", "--repeats", "1", "--breakdown"
    )
    assert p.returncode == 0, p.stderr
    rows = [
        line.split() for line in p.stdout.splitlines() if line.split()[:1] == ["2"] and len(line.split()) == 8
    ]
    assert [r[1] for r in rows] == ["dense", "ec", "tc"]
    for r in rows:  # the step is the sum of its kinds (as printed, to rounding)
        assert float(r[2]) == pytest.approx(sum(map(float, r[3:])), abs=0.35)


def test_bench_bad_granularity_is_one_line_error():
    p = _run("-G", "3", "--d-model", "32")
    assert p.returncode == 2 and "granularity G=3 must divide" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_bench_bf16_table():
    p = _run(
        "--dtype",
        "bf16",
        "-G",
        "1",
        "4",
        "--d-model",
        "128",
        "--batch",
        "16",
        "--seq",
        "64",
        "--repeats",
        "2",
    )
    assert p.returncode == 0, p.stderr
    assert "ec/dense" in p.stdout and "bfloat16" in p.stdout and "allocator:" in p.stdout


@pytest.mark.parametrize("settle, faulting_rounds, expected", [(8, 3, 4), (8, 20, 10), (0, 20, 2), (8, 0, 2)])
def test_warmup_runs_until_the_heap_stops_growing(monkeypatch, settle, faulting_rounds, expected):
    """Untimed rounds go on past `warmup` while a round page-faults, at most `settle` more."""
    from finemoe.benchmarks import moe_layer

    calls = {"n": 0}
    per_round = 2 * 2  # two layers (dense, ec), a reading before and after each step

    def fake_faults():  # every step of the first `faulting_rounds` rounds touches 500 fresh pages
        calls["n"] += 1
        return 500 * min(calls["n"] // 2, faulting_rounds * per_round // 2)

    monkeypatch.setattr(moe_layer, "_minor_faults", fake_faults)
    out = moe_layer.bench_moe_layer(
        granularities=(2,),
        d_model=32,
        expansion_rate=2,
        batch=4,
        seq=8,
        repeats=1,
        warmup=2,
        settle=settle,
        routings=("ec",),
    )
    assert out["warmup_rounds"] == {"2": expected}
    assert out["page_faults_per_step"]["ec"]["2"] == (500 if faulting_rounds > expected else 0)
