import json

import pytest
from _train_fixtures import cli, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from finemoe.cli import main
from finemoe.data.tokens import write_tokens
from finemoe.errors import ConfigError
from finemoe.train.config import TrainConfig
from finemoe.train.generate import sample
from finemoe.train.trainer import train

TEXT = "the cat sat on the mat . " * 400


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A model trained on one repeated sentence with a small word-level tokenizer."""
    root = tmp_path_factory.mktemp("gen")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    data = root / "data"
    data.mkdir()
    tok.save(str(data / "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    write_tokens(data / "train.bin", ids, 64)
    write_tokens(data / "val.bin", ids[:400], 64)
    cfg = tiny_config(data, root / "run", steps=60, lr=1e-2)
    train(TrainConfig.from_dict(cfg), quiet=True)
    return root / "run"


def test_generate_cli_continues_the_learned_text(run_dir):
    r = cli(
        "generate",
        str(run_dir),
        "--prompt",
        "the cat sat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["results"][0]
    assert out["text"].startswith("the cat sat") and len(out["tokens"]) == 3 + 8
    assert out["completion"].split()[:4] == ["on", "the", "mat", "."]  # greedy decoding learned the sentence


def test_generate_from_the_ckpt_file(run_dir, capsys):
    assert (
        main(
            [
                "generate",
                str(run_dir / "ckpt.pt"),
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "the cat sat on the"


def test_sampling_is_seeded_and_crops_the_context(run_dir):
    from finemoe.train.generate import load_model

    model, _ = load_model(run_dir)
    a = sample(model, [1, 2, 3], 40, temperature=1.0, top_k=5, seed=3)  # 43 tokens > seq_len 16
    assert a == sample(model, [1, 2, 3], 40, temperature=1.0, top_k=5, seed=3) and len(a) == 43
    assert all(0 <= t < 64 for t in a)


def test_generate_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--prompt", "x", "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_generate_from_the_model_folder(run_dir, capsys):
    """The safetensors export alone (model/), as a user would point at it, gives the same greedy text."""
    from finemoe.cli import main

    assert main(["generate", str(run_dir), "--prompt", "the cat sat", "--temperature", "0", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)["results"][0]
    assert (
        main(["generate", str(run_dir / "model"), "--prompt", "the cat sat", "--temperature", "0", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["results"][0]["text"] == from_run["text"]


# --- KV cache, batches and sampling on tiny random models -------------------------------------------

V, SEQ = 80, 16
KINDS = {
    "dense-learned": {"ffn": "dense"},
    "dense-rope": {"ffn": "dense", "pos_emb": "rope"},
    "tc-learned": {"routing": "tc"},
    "tc-rope": {"routing": "tc", "pos_emb": "rope"},
    "ec-learned": {"routing": "ec"},
    "ec-rope": {"routing": "ec", "pos_emb": "rope"},
}
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [12, 13, 14, 15, 16]]


def _tiny(kind: str, calibrated: bool = True, seed: int = 0):
    """A random model of the given kind in eval mode; Expert Choice thresholds calibrated unless told."""
    import torch

    from finemoe.config import ModelConfig
    from finemoe.nn.model import Transformer
    from finemoe.nn.moe import calibrate

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=V,
        seq_len=SEQ,
        d_model=32,
        head_dim=16,
        n_blocks=2,
        expansion_rate=2,
        granularity=2,
        **KINDS[kind],
    )
    model = Transformer(cfg).eval()
    if cfg.routing == "ec" and cfg.ffn == "moe" and calibrated:
        gen = torch.Generator().manual_seed(1)
        calibrate(model, [torch.randint(0, V, (8, SEQ), generator=gen) for _ in range(3)])
    return model


def _greedy(model, prompts, n=12, **kw):
    from finemoe.train.generate import generate_ids

    return generate_ids(model, prompts, n, temperature=0, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_the_full_forward_step_by_step(kind):
    import torch

    model = _tiny(kind)
    x = torch.randint(0, V, (3, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(3)
        parts = [model(x[:, :5], cache=cache).logits, model(x[:, 5:8], cache=cache).logits]  # prefill, chunk
        parts += [model(x[:, t : t + 1], cache=cache).logits for t in range(8, SEQ)]  # one token a step
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
    assert cache.length == SEQ
    with pytest.raises(ConfigError, match="seq_len"):
        model(x[:, :1], cache=cache)  # a full cache takes no more


@pytest.mark.parametrize("kind", ["dense-learned", "tc-rope", "ec-learned", "ec-rope"])
def test_left_padded_prefill_and_decode_give_each_row_its_own_logits(kind):
    import torch

    model = _tiny(kind)
    rows = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9]]
    width = max(map(len, rows))
    pad = torch.tensor([width - len(r) for r in rows])
    with torch.no_grad():
        cache = model.new_cache(3, pad)
        idx = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        batch = [model(idx, cache=cache).logits[:, -1]]
        nxt = torch.tensor([[7], [8], [9]])
        batch.append(model(nxt, cache=cache).logits[:, -1])
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r + [7 + i]])).logits[0]
            torch.testing.assert_close(batch[0][i], alone[-2], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch[1][i], alone[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_a_cache_is_greedy_without_token_for_token(kind):
    model = _tiny(kind)
    long_prompt = list(range(20, 20 + SEQ + 3))  # longer than seq_len: cropped to its last seq_len tokens
    prompts = [*PROMPTS, long_prompt]
    cached = _greedy(model, prompts, n=SEQ + 5)  # past seq_len: the window slides
    assert cached == _greedy(model, prompts, n=SEQ + 5, use_cache=False)
    assert all(len(c) == SEQ + 5 for c in cached)


@pytest.mark.parametrize("kind", ["dense-rope", "tc-learned", "ec-learned", "ec-rope"])
def test_a_batch_of_prompts_of_different_lengths_gives_each_what_it_gets_alone(kind):
    from finemoe.train.generate import generate_ids

    model = _tiny(kind)
    together = _greedy(model, PROMPTS, n=14)
    assert together == [_greedy(model, [p], n=14)[0] for p in PROMPTS]
    assert len({tuple(t) for t in together}) > 1  # the prompts did lead somewhere different
    sampled = generate_ids(model, PROMPTS, 10, temperature=1.0, top_k=20, seed=5)
    alone = [
        generate_ids(model, [p], 10, temperature=1.0, top_k=20, seed=5 + i)[0] for i, p in enumerate(PROMPTS)
    ]
    assert sampled == alone  # prompt i samples with seed + i, whatever its batch-mates


def test_an_uncalibrated_expert_choice_model_decodes_each_prompt_alone():
    from finemoe.train.generate import routes_per_token

    model = _tiny("ec-learned", calibrated=False)
    assert not routes_per_token(model)
    together = _greedy(model, PROMPTS, n=SEQ + 2)
    assert together == [_greedy(model, [p], n=SEQ + 2)[0] for p in PROMPTS]
    assert together == _greedy(model, PROMPTS, n=SEQ + 2, use_cache=False)
    assert routes_per_token(_tiny("ec-learned")) and routes_per_token(_tiny("tc-learned"))


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    from finemoe.train.generate import generate_ids

    model = _tiny("tc-rope")
    greedy = _greedy(model, PROMPTS, n=10)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}):
        assert generate_ids(model, PROMPTS, 10, temperature=1.5, seed=3, **kw) == greedy, kw
    assert generate_ids(model, PROMPTS, 10, temperature=1.5, seed=3) != greedy  # sampling does differ


def test_nucleus_keeps_the_fewest_likeliest_tokens_holding_top_p():
    import torch

    from finemoe.train.generate import filter_logits

    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=None, top_p=0.6) == [False, True, True]
    assert kept(top_k=None, top_p=0.5) == [False, True, False]  # 0.5 alone already holds 0.5
    assert kept(top_k=None, top_p=1.0) == [True, True, True]
    assert kept(top_k=2, top_p=None) == [False, True, True]


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_mode_alone():
    from finemoe.train.generate import generate_ids

    model = _tiny("dense-learned").train()
    a = generate_ids(model, PROMPTS, 20, temperature=1.0, top_p=0.9, seed=7)
    assert a == generate_ids(model, PROMPTS, 20, temperature=1.0, top_p=0.9, seed=7)
    assert a != generate_ids(model, PROMPTS, 20, temperature=1.0, top_p=0.9, seed=8)
    assert model.training  # generation ran in eval mode and gave the mode back
    assert all(0 <= t < V for row in a for t in row)


def test_a_row_stops_at_the_end_of_text_id_and_the_others_go_on():
    model = _tiny("tc-learned")
    free = _greedy(model, PROMPTS, n=12)
    eos = next(t for t in free[1] if any(t not in r for r in free))  # ends prompt 1, not all of them
    stopped = _greedy(model, PROMPTS, n=12, eos_id=eos)
    for row, ref in zip(stopped, free):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert row == ref[:cut]  # each row ends at its first eos (kept), the others unchanged
    assert stopped[1][-1] == eos and len(stopped[1]) < 12 and max(map(len, stopped)) == 12


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampling_settings_are_config_errors(kw, msg):
    from finemoe.train.generate import generate_ids

    args = {"max_new_tokens": 3, "temperature": 1.0, **kw}
    with pytest.raises(ConfigError, match=msg):
        generate_ids(_tiny("dense-learned"), PROMPTS, **args)


def test_bad_prompts_are_config_errors():
    from finemoe.train.generate import generate_ids

    model = _tiny("dense-learned")
    with pytest.raises(ConfigError, match="no tokens"):
        generate_ids(model, [[1], []], 3)
    with pytest.raises(ConfigError, match="vocab"):
        generate_ids(model, [[V]], 3)


# --- the CLI and the Python function on a trained run -----------------------------------------------


def test_generate_cli_two_prompts_as_json_each_as_alone(run_dir, capsys):
    argv = ["generate", str(run_dir / "model"), "--temperature", "0", "--max-new-tokens", "6"]
    assert main([*argv, "--prompt", "the cat sat", "--prompt", "mat .", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert [r["prompt"] for r in out] == ["the cat sat", "mat ."]
    assert out[0]["completion"].split()[:4] == ["on", "the", "mat", "."]
    assert all(r["text"].startswith(r["prompt"]) and r["stop"] == "length" for r in out)
    for r in out:
        assert main([*argv, "--prompt", r["prompt"], "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["results"][0] == r
    assert main([*argv, "--prompt", "the cat sat", "--prompt", "mat ."]) == 0
    assert capsys.readouterr().out == f"{out[0]['text']}\n\n{out[1]['text']}\n"


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--prompt", "the", "--top-p", "0"], "expected a number in (0, 1]"),
        (["--prompt", "the", "--top-p", "1.5"], "expected a number in (0, 1]"),
        (["--prompt", "the", "--top-p", "nan"], "expected a number in (0, 1]"),
        ([], "--prompt"),
        (["--prompt", "the", "--prompt", ""], "--prompt is empty"),
        (["--prompt", "the", "--top-k", "0"], "expected a positive integer"),
    ],
)
def test_generate_cli_bad_input_is_one_line_exit_2(run_dir, capsys, extra, msg):
    try:
        code = main(["generate", str(run_dir), *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and msg in err[0], err


def test_generate_cli_missing_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--top-p", "0.9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_the_python_function_matches_the_cli(run_dir, capsys):
    import finemoe

    assert (
        main(["generate", str(run_dir / "model"), "--prompt", "the cat", "--temperature", "0", "--json"]) == 0
    )
    cli_out = json.loads(capsys.readouterr().out)["results"][0]["completion"]
    text = finemoe.generate(run_dir / "model", "the cat", temperature=0)
    assert text == cli_out and text.split()[:3] == ["sat", "on", "the"]
    both = finemoe.generate(str(run_dir), ["the cat", "on the"], max_new_tokens=5, temperature=0)
    assert isinstance(both, list) and both[0].split() == cli_out.split()[:5]
    model = finemoe.load(run_dir / "model")
    tok = run_dir.parent / "data" / "tokenizer.json"
    assert finemoe.generate(model, ["the cat"], max_new_tokens=5, temperature=0, tokenizer=tok) == both[:1]
    sampled = finemoe.generate(model, "the", max_new_tokens=8, top_p=0.9, seed=1, tokenizer=str(tok))
    assert sampled == finemoe.generate(model, "the", max_new_tokens=8, top_p=0.9, seed=1, tokenizer=str(tok))
    with pytest.raises(ConfigError, match="tokenizer"):
        finemoe.generate(model, "the cat")
    with pytest.raises(ConfigError, match="top_p"):
        finemoe.generate(model, "the cat", top_p=2.0, tokenizer=tok)
    with pytest.raises(ConfigError, match="no prompts"):
        finemoe.generate(model, [], tokenizer=tok)
    with pytest.raises(ConfigError, match="no tokens"):
        finemoe.generate(model, [""], tokenizer=tok)
