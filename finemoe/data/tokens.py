"""Token files and deterministic batches.

A token file is a flat little-endian uint16 (vocab <= 65536) or uint32 array `NAME.bin` with a sidecar
`NAME.json` ({"dtype", "n_tokens", "vocab_size"}). Batches are a pure function of (seed, step): the
file is cut into non-overlapping windows of seq_len+1 tokens, the windows are permuted once per epoch
by the seed, and step s takes the next batch_size windows. A resumed run therefore sees exactly the
batches it would have seen, and no window repeats before every window was used once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finemoe.errors import DataError
from finemoe.io import atomic_path, write_json_atomic


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype("<u2")
    if vocab_size <= 2**32:
        return np.dtype("<u4")
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32; use a smaller tokenizer")


def write_tokens(path: str | Path, ids, vocab_size: int, dtype: str | None = None) -> None:
    """Write ids atomically; `dtype` forces a width (a uint16 file with a larger vocab is an error)."""
    path = Path(path)
    ids = np.asarray(ids)
    dt = np.dtype(dtype) if dtype else dtype_for_vocab(vocab_size)
    if dt == np.dtype("<u2") and vocab_size > 2**16:
        raise DataError(f"vocabulary of {vocab_size} is too large for uint16 tokens; use uint32")
    if ids.size == 0:
        raise DataError(f"no tokens to write to {path}; the input text is empty")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise DataError(
            f"token ids outside [0, {vocab_size}) in {path}; the tokenizer and vocab_size disagree"
        )
    with atomic_path(path) as tmp:
        ids.astype(dt).tofile(tmp)
    write_json_atomic(
        path.with_suffix(".json"), {"dtype": dt.str, "n_tokens": int(ids.size), "vocab_size": int(vocab_size)}
    )


class TokenFile:
    """Memory-mapped tokens with deterministic, resumable, non-repeating batch sampling."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise DataError(
                f"token file {self.path} (or its .json sidecar) not found; run `finemoe data prepare` first"
            )
        meta = json.loads(meta_path.read_text())
        self.vocab_size = int(meta["vocab_size"])
        self.tokens = np.memmap(self.path, dtype=np.dtype(meta["dtype"]), mode="r")
        if self.tokens.size != meta["n_tokens"]:
            raise DataError(
                f"{self.path} holds {self.tokens.size} tokens but its sidecar says {meta['n_tokens']}; "
                "rebuild it"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def n_windows(self, seq_len: int) -> int:
        return self.n_tokens // (seq_len + 1)

    def check_fits(self, batch_size: int, seq_len: int) -> None:
        if self.n_windows(seq_len) < batch_size:
            raise DataError(
                f"{self.path} has {self.n_tokens} tokens, fewer than one batch of "
                f"{batch_size}x{seq_len + 1}; "
                "use more text or a smaller batch_size/seq_len"
            )

    def _order(self, epoch: int, seed: int, n: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        """Inputs and targets [batch_size/world_size, seq_len] (int64) for this rank at this step.

        The global batch is the same for any world_size; rank r takes the r-th contiguous block of its
        rows, so blocks of consecutive sequences (Expert Choice groups, micro-batches) stay on one rank.
        """
        self.check_fits(batch_size, seq_len)
        if batch_size % world_size:
            raise DataError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        n = self.n_windows(seq_len)
        local = batch_size // world_size
        flat = np.arange(step * batch_size + rank * local, step * batch_size + (rank + 1) * local)
        epochs, pos = np.divmod(flat, n)
        windows = np.empty_like(flat)
        for e in np.unique(epochs):
            sel = epochs == e
            windows[sel] = self._order(int(e), seed, n)[pos[sel]]
        starts = windows * (seq_len + 1)
        rows = np.stack([np.asarray(self.tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
        return rows[:, :-1], rows[:, 1:]
