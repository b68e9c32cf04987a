"""Expert parallelism on CPU (gloo): experts split over ep ranks, tokens sent to them and back with
all_to_all_single. Training follows one process's loss curve for Token Choice and for Expert Choice in
fixed groups; each rank holds 1/ep of the experts and their AdamW states; a sharded checkpoint resumes
at another ep and world size."""

import json

import pytest
from _distributed import (
    STEPS,
    losses,
    needs_distributed,
    parallel_config,
    torchrun,
    torchrun_train,
    train_here,
)
from _train_fixtures import ROOT, read_metrics, write_config

from finemoe.errors import ConfigError
from finemoe.train.config import TrainConfig

pytestmark = needs_distributed


@pytest.mark.parametrize(
    "model,procs,ep,fsdp",
    [("tc", 2, 2, False), ("ec", 4, 4, False), ("tc", 4, 2, False), ("tc", 4, 2, True), ("ec", 4, 2, True)],
    ids=lambda x: str(x),
)
def test_expert_parallel_matches_one_process(tmp_path, model, procs, ep, fsdp):
    """(tc, 4, 2) is 2 data-parallel replicas of 2 expert-parallel ranks: an expert's gradient is also
    summed over its replicas."""
    one = train_here(parallel_config(tmp_path, "one", model))
    par = {"ep": ep, "fsdp": fsdp}  # with fsdp, FSDP2 shards the rest over all ranks, the experts over dp
    cfg = write_config(tmp_path / "ep.yaml", parallel_config(tmp_path, "ep", model, parallel=par))
    rec = torchrun_train(procs, cfg)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "ep")
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-5)
    assert a[0] - a[-1] > 0.3  # the curve moves, so matching it means something
    # AdamW hides a constant scale on the gradients from the loss; their norm does not
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / n)] for n in ("one", "ep")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)
    assert rec["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    for key in ("expert_param_bytes_per_rank", "expert_optimizer_bytes_per_rank"):
        print(f"{model} ep={ep} fsdp={fsdp} on {procs} processes, {key}: {rec[key]} (1 process: {one[key]})")
        share = procs if fsdp else ep
        assert rec[key] == pytest.approx(one[key] / share, rel=0.01)  # AdamW's step counters aside
    if fsdp:  # and every other weight is sharded too
        assert rec["param_bytes_per_rank"] == pytest.approx(one["param_bytes_per_rank"] / procs, rel=0.01)
    # the export is the whole model
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("one", "ep"))
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert float((w2["blocks.0.ffn.experts.w1"] - w1["blocks.0.ffn.experts.w1"]).abs().max()) < 1e-4


@pytest.mark.parametrize("procs", [2, 4])
def test_token_choice_on_grouped_gemms_matches_the_whole_layer(procs):
    """The dropless path (exactly each expert's slots sent, grouped GEMMs; GPUs take it by default):
    output, input gradient and each rank's expert gradients as one process computes them."""
    r = torchrun(procs, str(ROOT / "tests" / "ep_grouped_worker.py"), "cpu", "float32")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["grouped_calls"] == 1 and max(out["y"], out["dx"], out["dw1"], out["dw2"]) < 1e-5, out


def test_expert_parallel_checkpoint_resumes_at_another_ep(tmp_path):
    """FSDP x EP (2 x 2) on 4 processes stops at step 5, ep=4 on 4 goes on to 10, ep=2 on 2 to 15, one
    process finishes."""
    one = train_here(parallel_config(tmp_path, "one", "ec"))
    par = {"ep": 2, "fsdp": True}
    cfg = write_config(tmp_path / "cut.yaml", parallel_config(tmp_path, "cut", "ec", parallel=par))
    assert torchrun_train(4, cfg, "stop_at_step=5")["status"] == "stopped"
    torchrun_train(4, cfg, "--resume", "stop_at_step=10", "parallel.ep=4", "parallel.fsdp=false")
    torchrun_train(2, cfg, "--resume", "stop_at_step=15", "parallel.ep=2", "parallel.fsdp=false")
    last = train_here(parallel_config(tmp_path, "cut", "ec"), resume=True)
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert last["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


def test_expert_parallel_refuses_what_it_cannot_split(tmp_path):
    with pytest.raises(ConfigError, match="must divide the 4 experts"):
        TrainConfig.from_dict(parallel_config(tmp_path, "x", "ec", parallel={"ep": 3}))
    dense = {**parallel_config(tmp_path, "x", "ec", parallel={"ep": 2}), "model": {"ffn": "dense"}}
    with pytest.raises(ConfigError, match="of an MoE model"):
        TrainConfig.from_dict(dense)
