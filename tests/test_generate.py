import json

import pytest
from _train_fixtures import cli, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from finemoe.cli import main
from finemoe.data.tokens import write_tokens
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
    out = json.loads(r.stdout)
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
    from_run = json.loads(capsys.readouterr().out)
    assert (
        main(["generate", str(run_dir / "model"), "--prompt", "the cat sat", "--temperature", "0", "--json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["text"] == from_run["text"]
