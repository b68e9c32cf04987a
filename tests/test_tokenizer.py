"""Byte-level BPE: deterministic training, exact round trips, <|endoftext|> handling, clear errors."""

import pytest

from finemoe.data.corpus import EOT
from finemoe.data.tokenizer import load_tokenizer, train_bpe
from finemoe.errors import DataError

TEXTS = [
    f"The {w} sat on the mat; the {w} was happy number {i}.\n" * 3
    for i, w in enumerate(["cat", "dog", "bird", "fish", "horse", "mouse"] * 10)
]


def test_training_is_deterministic():
    a = train_bpe(TEXTS, vocab_size=320)
    b = train_bpe(TEXTS, vocab_size=320)
    assert a.to_str() == b.to_str()
    assert a.vocab_size == 320 and a.eot_id == 0


@pytest.mark.parametrize(
    "text", ["The cat sat.", "  leading spaces\n\ttabs\r\n", "naïve café — “quotes” 🤗 中文", ""]
)
def test_round_trip_is_exact(text):
    tok = train_bpe(TEXTS, vocab_size=300)
    assert tok.decode(tok.encode(text)) == text
    assert all(0 <= i < tok.vocab_size for i in tok.encode(text))


def test_endoftext_is_one_special_token():
    tok = train_bpe(TEXTS, vocab_size=300)
    ids = tok.encode(f"the cat{EOT}the dog")
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == f"the cat{EOT}the dog"
    assert len(tok.encode("the cat the cat")) < len("the cat the cat")  # merges were learned


def test_save_and_load(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=300)
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("the happy horse") == tok.encode("the happy horse") and loaded.eot_id == 0


def test_errors():
    with pytest.raises(DataError, match="below 257"):
        train_bpe(TEXTS, vocab_size=100)
    with pytest.raises(DataError, match="finemoe data prepare"):
        load_tokenizer("/nonexistent/folder")
