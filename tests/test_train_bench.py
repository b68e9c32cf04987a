"""Smoke test of benchmarks/bench_train.py at a toy size (the real numbers come from `make bench`)."""

from _train_fixtures import load_benchmark


def test_bench_train_smoke(capsys):
    bench = load_benchmark("bench_train")
    r = bench.bench(
        d_model=32,
        n_blocks=1,
        seq_len=16,
        batch_size=4,
        vocab=64,
        granularity=2,
        expansion_rate=2,
        steps=2,
        rounds=1,
        gemm_n=128,
    )
    assert r["gemm_flops_per_s"] > 0
    expected = {"dense"} | ({"moe G=2"} if bench.moe_available() is None else set())
    assert set(r["models"]) == expected
    for m in r["models"].values():
        assert m["tokens_per_s"] > 0 and 0 < m["mfu_paper"] < m["mfu"] and m["timed_steps"] == 2
    assert ("skipped" in r) == (bench.moe_available() is not None)
    assert "GEMM peak" in bench.human(r)


def test_bench_train_compares_cpu_linear_paths():
    bench = load_benchmark("bench_train")
    r = bench.bench(
        d_model=32,
        n_blocks=1,
        seq_len=16,
        batch_size=4,
        vocab=64,
        granularity=2,
        expansion_rate=2,
        steps=1,
        rounds=1,
        gemm_n=64,
        cpu_matmuls=("mkl", "onednn"),
    )
    models = set(bench.models(32, 1, 16, 64, 2, 2))
    assert set(r["models"]) == models | {f"{m} [onednn]" for m in models}
    speed = r["speedup_over_mkl"]["onednn"]
    assert set(speed) == models and all(v > 0 for v in speed.values())
    assert "onednn CPU linear path / mkl" in bench.human(r)
