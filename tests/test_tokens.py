import numpy as np
import pytest

from finemoe.data.tokens import TokenFile, write_tokens
from finemoe.errors import DataError


@pytest.fixture
def tf(tmp_path):
    write_tokens(tmp_path / "t.bin", np.arange(1000), vocab_size=1000)
    return TokenFile(tmp_path / "t.bin")


def test_batches_are_deterministic_and_shifted(tf):
    x, y = tf.batch(3, 4, 9, seed=1)
    x2, y2 = tf.batch(3, 4, 9, seed=1)
    assert x.shape == (4, 9) and x.dtype == np.int64
    assert np.array_equal(x, x2) and np.array_equal(x[:, 1:], y[:, :-1])
    assert not np.array_equal(x, tf.batch(3, 4, 9, seed=2)[0])


def test_no_window_repeats_within_an_epoch(tf):
    n = tf.n_windows(9)  # 100 windows
    seen = np.concatenate([tf.batch(s, 5, 9, seed=0)[0][:, 0] for s in range(n // 5)])
    assert len(np.unique(seen)) == n  # first token of each window is distinct by construction


def test_ranks_take_contiguous_blocks_of_the_global_batch(tf):
    """Blocks, not strides: Expert Choice groups of consecutive sequences stay on one rank."""
    full = tf.batch(2, 8, 9, seed=0)[0]
    for world in (2, 4):
        parts = [tf.batch(2, 8, 9, seed=0, rank=r, world_size=world)[0] for r in range(world)]
        assert np.array_equal(np.concatenate(parts), full)


def test_clear_errors(tmp_path, tf):
    with pytest.raises(DataError, match="not found"):
        TokenFile(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="fewer than one batch"):
        tf.batch(0, 1000, 9, seed=0)
    with pytest.raises(DataError, match="too large for uint16"):
        write_tokens(tmp_path / "u.bin", [1, 2], vocab_size=70000, dtype="<u2")
    with pytest.raises(DataError, match="empty"):
        write_tokens(tmp_path / "e.bin", [], vocab_size=10)
