"""Smoke test of benchmarks/bench_cpu_gemm.py at a toy size (the real numbers come from `make bench`)."""

import pytest
from _train_fixtures import load_benchmark


def test_bench_cpu_gemm_smoke():
    bench = load_benchmark("bench_cpu_gemm")
    r = bench.bench(d_model=32, tokens=64, granularity=2, expansion_rate=2, repeats=2, warmup=1)
    assert len(r["cases"]) == 3
    for c in r["cases"].values():
        assert c["mkl_ms"] > 0 and c["onednn_ms"] > 0 and c["speedup"] > 0
        assert c["max_rel_err"] < 1e-4  # both sides compute the same fp32 products
    assert "mkl/onednn" in bench.human(r)
    with pytest.raises(ValueError, match="multiple of the granularity"):
        bench.bench(d_model=32, tokens=64, granularity=3, expansion_rate=2)
