"""Smoke test of benchmarks/bench_cpu_gemm.py at a toy size (the real numbers come from `make bench`)."""

import importlib.util
import sys

import pytest

from _train_fixtures import ROOT


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_cpu_gemm", ROOT / "benchmarks" / "bench_cpu_gemm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_gemm_smoke():
    bench = _bench_module()
    r = bench.bench(d_model=32, tokens=64, granularity=2, expansion_rate=2, repeats=2, warmup=1)
    assert len(r["cases"]) == 3
    for c in r["cases"].values():
        assert c["mkl_ms"] > 0 and c["onednn_ms"] > 0 and c["speedup"] > 0
        assert c["max_rel_err"] < 1e-4  # both sides compute the same fp32 products
    assert "mkl/onednn" in bench.human(r)
    with pytest.raises(ValueError, match="multiple of the granularity"):
        bench.bench(d_model=32, tokens=64, granularity=3, expansion_rate=2)
