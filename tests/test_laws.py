import json
from dataclasses import replace

import numpy as np
import pytest

from finemoe.errors import ConfigError
from finemoe.scaling.laws import PUBLISHED, GranularityLaw, load_coefficients


def test_table1_law_matches_paper_check_values():
    # paper notes, check 4: Table 1 coefficients with c = 0.472 at 64x25M, 16B tokens
    law = replace(load_coefficients("paper").moe, c=0.472)
    N = 1_082_130_432
    assert law.loss(N, 16e9, 1) == pytest.approx(3.293, abs=5e-4)
    assert law.loss(N, 16e9, 16) == pytest.approx(3.139, abs=5e-4)


def test_precise_coefficients_at_printed_table2_rows():
    # paper notes, check 6: Eq. 9 at the printed (N = 43 N_act, D, G) of Table 2
    law = load_coefficients("paper-precise").moe
    rows = [
        (100e6, 4.37e9, 8),
        (1e9, 28.94e9, 16),
        (3e9, 72.90e9, 16),
        (7e9, 137.60e9, 32),
        (70e9, 941.07e9, 32),
        (300e9, 2.96e12, 64),
        (1e12, 7.94e12, 64),
    ]
    want = [3.135, 2.493, 2.246, 2.079, 1.696, 1.505, 1.369]
    n_act, D, G = map(np.array, zip(*rows))
    got = law.loss(n_act * (8 * 64 + 4) / 12, D, G)
    np.testing.assert_allclose(got, want, atol=1.5e-3)


def test_published_sets_load_with_both_laws():
    for name in PUBLISHED:
        c = load_coefficients(name)
        assert c.moe is not None and c.dense is not None and c.name == name
    assert load_coefficients("paper-e16").expansion_rate == 16
    assert load_coefficients("paper").dense.alpha == 0.126


def test_granularity_law_falls_with_g():
    law = GranularityLaw(g=0.2, gamma=0.6, h=3.0)
    vals = law.loss([1, 2, 4, 8])
    assert vals[0] == pytest.approx(3.2) and np.all(np.diff(vals) < 0)


def test_user_json_round_trip(tmp_path):
    c = load_coefficients("paper-holdout")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(c.to_dict()))
    back = load_coefficients(str(p))
    assert back.moe == c.moe and back.dense == c.dense


@pytest.mark.parametrize(
    "content, msg",
    [
        ("{not json", "cannot read JSON"),
        ('{"moe": {"a": 1}}', "missing coefficient"),
        (
            '{"moe": {"a": -1, "alpha": 0.1, "b": 1, "beta": 0.1, "g": 1, "gamma": 0.5, "c": 0.5}}',
            "non-negative",
        ),
        ('{"other": 1}', "'moe' and/or 'dense'"),
    ],
)
def test_bad_coefficient_files(tmp_path, content, msg):
    p = tmp_path / "c.json"
    p.write_text(content)
    with pytest.raises(ConfigError, match=msg):
        load_coefficients(str(p))


def test_unknown_name():
    with pytest.raises(ConfigError, match="not a published set"):
        load_coefficients("paper-typo")


def test_missing_dense_law_named():
    c = replace(load_coefficients("paper"), dense=None)
    with pytest.raises(ConfigError, match="no dense law"):
        c.require("dense")
