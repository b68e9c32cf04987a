"""The parallel paths on GPUs: NCCL, bf16 autocast, FSDP2 and expert parallelism. Skipped without two
CUDA devices; the CPU tests (gloo, fp32) check the same paths to float rounding."""

import pytest
import torch
from _distributed import torchrun_train, train_here
from _train_fixtures import make_data, read_metrics, tiny_config, write_config

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
MOE = {"ffn": "moe", "expansion_rate": 2, "granularity": 2, "routing": "ec", "ec_group_size": 2}


@pytest.mark.parametrize(
    "parallel",
    [{}, {"fsdp": True}, {"ep": 2}, {"fsdp": True, "ep": 2}],
    ids=["ddp", "fsdp", "ep", "fsdp-ep"],
)
def test_two_gpus_under_bf16_follow_one_gpu(tmp_path, parallel):
    base = tiny_config(
        make_data(tmp_path / "data"),
        tmp_path / "one",
        steps=20,
        batch_size=8,
        lb_loss_weight=0.0,
        device="cuda",
        dtype="bf16",
        model=MOE,
    )
    one = train_here(base)
    cfg = write_config(
        tmp_path / "two.yaml", {**base, "out_dir": str(tmp_path / "two"), "parallel": parallel}
    )
    two = torchrun_train(2, cfg)
    assert two["world_size"] == 2 and two["device"].startswith("cuda")
    a, b = ([r["loss"] for r in read_metrics(tmp_path / n)] for n in ("one", "two"))
    assert b == pytest.approx(a, rel=2e-2)  # bf16 rounding differs with the reduction order
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=2e-2)


def test_grouped_gemm_experts_under_expert_parallelism_on_two_gpus():
    """Token Choice's dropless EP path on grouped GEMMs in bf16 with NCCL, against the whole layer."""
    import json

    from _distributed import torchrun
    from _train_fixtures import ROOT

    r = torchrun(2, str(ROOT / "tests" / "ep_grouped_worker.py"), "cuda", "bfloat16")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # bf16 rounding
    assert out["grouped_calls"] == 1 and max(out["y"], out["dx"], out["dw1"], out["dw2"]) < 3e-2, out
