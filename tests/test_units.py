import math

import pytest

from finemoe.units import count


@pytest.mark.parametrize(
    "x, digits, want",
    [
        (512, 3, "512"),
        (26214, 3, "26.2K"),
        (135_266_304, 3, "135M"),
        (135_266_304, 4, "135.3M"),
        (1_082_130_432, 3, "1.08B"),
        (3.65e12, 3, "3.65T"),
        (999_970, 3, "1M"),  # rounding carries into the next unit
        (999.9e12, 3, "1e+15"),  # and past the largest one into scientific notation
        (1.0204e20, 3, "1.02e+20"),  # no 102040000T
        (-5e6, 3, "-5M"),
        (None, 3, "–"),
        (math.nan, 3, "–"),
        (math.inf, 3, "–"),
    ],
)
def test_count(x, digits, want):
    assert count(x, digits) == want
