"""Iso-FLOP specs (tokens from compute budgets) and WSD cooldown branches in sweeps."""

from pathlib import Path

import pytest

from finemoe.accounting import paper_counts
from finemoe.config import ModelConfig
from finemoe.errors import ConfigError
from finemoe.sweep import spec as specmod
from finemoe.sweep.driver import run_sweep
from finemoe.sweep.executors import LocalExecutor, waves
from finemoe.sweep.store import Store, load_runs
from finemoe.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FAKE = "sweep_fake_trainer:fake_train"


def _raw(tmp_path, **over):
    raw = {
        "name": "iso",
        "data_dir": str(tmp_path / "data"),
        "runs_dir": str(tmp_path / "runs"),
        "model": {"vocab_size": 64, "seq_len": 16, "expansion_rate": 4},
        "train": {"batch_size": 4, "schedule": "wsd", "cooldown_fraction": 0.2},
        "sizes": [
            {"d_model": 64, "n_blocks": 1, "budgets": [4e8, 1.2e9, 4e9]},
            {"d_model": 64, "n_blocks": 2, "budgets": [1.2e9]},
        ],
        "granularities": [1, 4],
        "dense": True,
        "branches": True,
        "trainer": FAKE,
    }
    raw.update(over)
    return raw


def test_budgets_set_whole_steps_of_tokens_and_are_kept(tmp_path):
    s = specmod.expand(_raw(tmp_path, branches=False))
    assert len(s.runs) == 3 * 3 + 3
    for r in s.runs:
        mc = ModelConfig.from_dict(r.config["model"])
        per_token, step = paper_counts(mc)["flops_per_token"], 4 * 16
        d = r.config["tokens"]
        assert d % step == 0 and d <= r.budget / per_token < d + step  # the whole steps the budget buys
        assert f"F={r.budget:.3g}" in r.label and r.parent is None
    # a G=4 MoE pays for its router: fewer tokens than the dense model at the same budget
    at = {
        (r.config["model"]["ffn"], r.config["model"].get("granularity")): r.config["tokens"]
        for r in s.runs
        if r.budget == 4e9
    }
    assert at[("moe", 4)] < at[("moe", 1)] < at[("dense", 1)]


def test_exact_flops_budgets_count_the_embedding_and_head(tmp_path):
    """flops: exact charges every matmul FLOP, so the same budget buys fewer tokens, and the smallest
    model (whose head is most of its cost) the fewest relative to the paper's count."""
    from finemoe.accounting import exact_flops_per_token

    paper = {
        r.label.split(" D=")[0] + str(r.budget): r
        for r in specmod.expand(_raw(tmp_path, branches=False)).runs
    }
    exact = specmod.expand(_raw(tmp_path, branches=False, flops="exact")).runs
    for r in exact:
        twin = paper[r.label.split(" D=")[0] + str(r.budget)]
        per_token = exact_flops_per_token(ModelConfig.from_dict(r.config["model"]))["total"]
        assert r.config["tokens"] <= r.budget / per_token < r.config["tokens"] + 4 * 16
        assert r.config["tokens"] < twin.config["tokens"] and r.run_id != twin.run_id
    with pytest.raises(ConfigError, match="'flops' must be one of paper, exact"):
        specmod.expand(_raw(tmp_path, flops="real"))


def test_branches_make_the_longest_run_the_parent_of_each_group(tmp_path):
    s = specmod.expand(_raw(tmp_path))
    by_id = {r.run_id: r for r in s.runs}
    parents = [r for r in s.runs if r.parent is None]
    assert len(parents) == 3 + 3 and len(s.runs) - len(parents) == 6  # size 1: 3 groups of 3; size 2: 3 alone
    for r in s.runs:
        cfg = TrainConfig.from_dict(r.config)
        if r.parent is None:
            continue
        p = by_id[r.parent]
        assert s.runs.index(p) < s.runs.index(r) and p.config["tokens"] > r.config["tokens"]
        assert r.config["warmup_tokens"] == p.config["warmup_tokens"]
        assert cfg.decay_start in p.config["snapshot_steps"]
        assert r.config["init_from"] == str(
            Path(p.config["out_dir"]) / "snapshots" / f"step_{cfg.decay_start}.pt"
        )
        ours, theirs = cfg.lr_multiplier(), TrainConfig.from_dict(p.config).lr_multiplier()
        assert all(
            ours(k) == theirs(k) for k in range(cfg.decay_start)
        )  # a branch is the same run until its decay


def test_snapshot_settings_do_not_change_run_ids(tmp_path):
    branched = specmod.expand(_raw(tmp_path))
    assert len({r.run_id for r in branched.runs}) == len(branched.runs)
    moved = specmod.expand(_raw(tmp_path, runs_dir=str(tmp_path / "elsewhere")))
    assert [r.run_id for r in moved.runs] == [r.run_id for r in branched.runs]  # init_from paths moved
    for r in branched.runs:
        changed = {**r.config, "snapshot_steps": [7, 9], "init_from": "x.pt", "out_dir": "y"}
        assert specmod.config_hash(changed) == r.run_id
        assert specmod.config_hash({**r.config, "lr": 0.5}) != r.run_id  # what it computes is its id


def test_the_same_run_listed_twice_is_one_run_with_every_snapshot(tmp_path):
    sizes = [
        {"d_model": 64, "n_blocks": 1, "tokens": [64 * 1000, 64 * 250]},
        {"d_model": 64, "n_blocks": 1, "tokens": [64 * 1000, 64 * 500]},
    ]
    s = specmod.expand(_raw(tmp_path, sizes=sizes, granularities=[], dense=True))
    assert len(s.runs) == 3
    parent, *branches = s.runs
    steps = sorted(TrainConfig.from_dict(b.config).decay_start for b in branches)
    assert parent.config["snapshot_steps"] == steps and all(b.parent == parent.run_id for b in branches)


def test_an_explicit_null_warmup_still_gets_the_shared_one(tmp_path):
    train = {**_raw(tmp_path)["train"], "warmup_tokens": None}
    s = specmod.expand(_raw(tmp_path, train=train))
    for r in s.runs:
        if r.parent:
            parent = next(p for p in s.runs if p.run_id == r.parent)
            assert r.config["warmup_tokens"] == parent.config["warmup_tokens"] is not None


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"train": {"batch_size": 4}}, "needs train: {schedule: wsd}"),
        ({"branches": "yes"}, "'branches' must be true or false"),
        (
            {"sizes": [{"d_model": 64, "n_blocks": 1, "budgets": [1e9], "tokens": [1000]}]},
            "both token budgets and compute",
        ),
        ({"sizes": [{"d_model": 64, "n_blocks": 1, "budgets": [10]}]}, "buys less than one step"),
        ({"sizes": [{"d_model": 64, "n_blocks": 1, "budgets": ["lots"]}]}, "must be a number"),
        ({"granularities": [2.7]}, "whole numbers"),
    ],
)
def test_isoflop_spec_errors_are_one_line(tmp_path, over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        specmod.expand(_raw(tmp_path, **over))
    assert "\n" not in str(e.value)


def test_waves_put_parents_first():
    assert waves(["b", "a", "c"], {"b": "a", "c": "b"}) == [["a"], ["b"], ["c"]]
    assert waves(["x", "y"], {"x": None, "y": "gone"}) == [["x", "y"]]  # a parent not to run does not block


def test_a_sweep_records_budgets_and_parents_and_runs_parents_first(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    spec = specmod.expand(_raw(tmp_path, executor={"kind": "inprocess"}, csv=str(tmp_path / "out.csv")))
    out = run_sweep(spec, log=lambda *_: None)
    assert out["done"] == len(spec.runs)
    df = load_runs(spec.store)
    assert set(df.budget.dropna()) == {4e8, 1.2e9, 4e9}
    parents = {r.run_id: r.parent for r in spec.runs}
    assert {k: (v if isinstance(v, str) else None) for k, v in zip(df.run_id, df.parent)} == parents
    finished = {rid: t for rid, t in zip(df.run_id, df.finished_at)}
    assert all(finished[p] <= finished[c] for c, p in parents.items() if p)
    csv = load_runs(tmp_path / "out.csv")
    assert {"budget", "parent"} <= set(csv.columns)


def test_the_local_executor_holds_a_branch_until_its_parent_ends(tmp_path, monkeypatch):
    events = []

    class Proc:  # a worker that ends on its third poll
        returncode = 0

        def __init__(self):
            self.polls = 0

        def poll(self):
            self.polls += 1
            return 0 if self.polls > 2 else None

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 0

    ex = LocalExecutor(workers=3, threads=1)
    monkeypatch.setattr(ex, "_spawn", lambda store, rid, trainer: events.append(("start", rid)) or Proc())
    monkeypatch.setattr("finemoe.sweep.executors.time.sleep", lambda s: None)
    ex.run(
        Store(tmp_path / "s.sqlite"),
        ["p", "c1", "c2", "q"],
        "x:y",
        lambda rid: events.append(("done", rid)),
        parents={"c1": "p", "c2": "p"},
    )
    assert events[:2] == [("start", "p"), ("start", "q")]  # three workers, but the branches wait
    assert events.index(("done", "p")) < events.index(("start", "c1")) < events.index(("start", "c2"))
    assert sorted(rid for kind, rid in events if kind == "done") == ["c1", "c2", "p", "q"]
