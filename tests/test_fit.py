import math

import numpy as np
import pytest
from scipy.optimize import check_grad

from finemoe import accounting as acc
from finemoe.errors import DataError
from finemoe.scaling import fit as F
from finemoe.scaling.laws import DenseLaw, load_coefficients

TRUE = load_coefficients("paper-precise")


def grid(noise=0.0, seed=0, dense=False, gs=(1, 2, 4, 8, 16), jitter=True):
    """The paper's grid shape: 5 sizes x 3 token counts x 5 granularities."""
    rng = np.random.default_rng(seed)
    N, D, G = [], [], []
    for d, n in ((256, 4), (384, 6), (512, 8), (640, 10), (768, 12)):
        for toks in (16e9, 33e9, 66e9):
            for g in (1,) if dense else gs:
                N.append(acc.total_params(d, n, 1 if dense else 64))
                D.append(toks * (rng.uniform(0.3, 1.0) if jitter else 1.0))
                G.append(g)
    N, D, G = map(np.array, (N, D, G))
    y = TRUE.dense.loss(N, D) if dense else TRUE.moe.loss(N, D, G)
    return F.Points(N, D, G, y + noise * rng.standard_normal(len(y)))


def test_noise_free_moe_recovers_all_seven_coefficients():
    res = F.fit(grid(), "moe", holdout=None)
    want = vars(TRUE.moe)
    for k, v in res.params.items():
        assert v == pytest.approx(want[k], rel=2e-3), k  # stated tolerance: 0.2%
    assert res.rmse < 1e-5


def test_noise_free_dense_recovers_coefficients():
    res = F.fit(grid(dense=True), "dense", holdout=None)
    for k, v in vars(TRUE.dense).items():
        assert res.params[k] == pytest.approx(v, rel=2e-3), k
    assert isinstance(res.model(), DenseLaw)


def test_noisy_fit_with_fixed_c_predicts_the_true_law():
    pts = grid(noise=0.01, seed=3)
    res = F.fit(pts, "moe", fixed={"c": 0.472}, holdout=0.2)
    assert res.params["c"] == 0.472 and res.fixed == {"c": 0.472}
    assert 0.006 < res.rmse < 0.012  # about the noise level
    assert res.holdout["n_heldout"] == round(0.2 * len(pts)) and res.holdout["rmse"] < 0.02
    # stated tolerance: within 0.01 of the true law over the fitted range; exponents within 15%
    np.testing.assert_allclose(
        res.model().loss(pts.N, pts.D, pts.G), TRUE.moe.loss(pts.N, pts.D, pts.G), atol=0.01
    )
    assert res.params["alpha"] == pytest.approx(TRUE.moe.alpha, rel=0.15)
    assert res.params["gamma"] == pytest.approx(TRUE.moe.gamma, rel=0.15)


def test_holdout_is_the_best_runs():
    pts = grid(noise=0.005, seed=1)
    res = F.fit(pts, "moe", fixed={"c": 0.472}, holdout=0.2)
    ho = res.holdout
    assert np.max(pts.loss[ho["index"]]) <= np.min(np.delete(pts.loss, ho["index"]))


def test_bootstrap_percentiles_of_coefficients_and_derived():
    pts = grid(noise=0.01, seed=2)
    derived = lambda law: {"G_opt": 8.0 * law.gamma / law.gamma}  # noqa: E731
    res = F.fit(pts, "moe", fixed={"c": 0.472}, holdout=None, bootstrap=8, derived=derived, seed=5)
    b = res.bootstrap
    assert b["n"] + b["skipped"] == 8 and b["percentiles"] == [10, 90]
    for k in ("a", "alpha", "b", "beta", "g", "gamma"):
        lo, hi = b["values"][k]
        assert lo <= hi
    assert b["values"]["G_opt"] == [8.0, 8.0]
    assert b["values"]["c"] == [0.472, 0.472]


def test_log_space_and_chinchilla_delta():
    res = F.fit(grid(), "moe", space="log", huber_delta=1e-3, fixed={"c": 0.472}, holdout=None)
    assert res.params["gamma"] == pytest.approx(TRUE.moe.gamma, rel=2e-3)


def test_granularity_law_per_group():
    pts = grid(jitter=False)
    res = F.fit(pts, "granularity")
    assert len(res.groups) == len(np.unique(np.stack([pts.N, pts.D], 1), axis=0))
    for g in res.groups:  # Eq. 9 restricted to one (N, D) is exactly Eq. 4 with g N^-alpha, gamma
        assert g["gamma"] == pytest.approx(TRUE.moe.gamma, rel=1e-3)
        assert g["g"] == pytest.approx(TRUE.moe.g * g["N"] ** -TRUE.moe.alpha, rel=1e-3)


@pytest.mark.parametrize("law", ["moe", "dense", "granularity"])
@pytest.mark.parametrize("space,wd", [("loss", 0.0), ("log", 0.0), ("loss", 5e-3)])
def test_analytic_gradient(law, space, wd):
    spec = F._LAWS[law]
    pts = grid(noise=0.02, seed=4, dense=law == "dense")
    free = np.ones(len(spec.names), bool)
    theta0 = np.log([np.mean(v) for v in (spec.grid[k] for k in spec.names)]) + 0.05  # off |p|'s kink at 0
    f = F._objective(spec, pts.features(), pts.loss, free, theta0, F.Objective(0.05, space, wd))
    err = check_grad(lambda t: f(t)[0], lambda t: f(t)[1], theta0)
    assert err < 1e-5 * max(1.0, np.linalg.norm(f(theta0)[1]))


def test_weight_decay_shrinks_the_regularised_parameters():
    """The paper code's regulariser pulls log-coefficients towards 0 and exponents towards 0."""
    pts = grid(noise=0.01, seed=2)
    plain = F.fit(pts, "moe", fixed={"c": TRUE.moe.c}, holdout=None)
    reg = F.fit(pts, "moe", fixed={"c": TRUE.moe.c}, holdout=None, weight_decay=0.05)
    size = lambda p: sum(abs(math.log(p[k])) if k not in F.EXPONENTS else p[k] for k in p if k != "c")  # noqa: E731
    assert size(reg.params) < size(plain.params)
    assert reg.to_dict()["weight_decay"] == 0.05 and reg.rmse >= plain.rmse
    with pytest.raises(DataError, match="weight decay"):
        F.fit(pts, "moe", weight_decay=-1.0)


def test_huber_switches_to_linear():
    h, dh = F.huber(np.array([0.05, -0.3]), 0.1)
    np.testing.assert_allclose(h, [0.5 * 0.05**2, 0.1 * (0.3 - 0.05)])
    np.testing.assert_allclose(dh, [0.05, -0.1])


def _pts(**kw):
    base = grid()
    d = {k: getattr(base, k).copy() for k in ("N", "D", "G", "loss")}
    d.update(kw)
    return F.Points(**d)


@pytest.mark.parametrize(
    "make, law, msg",
    [
        (lambda: grid().take(np.arange(5)), "moe", "cannot fit the moe law"),
        (lambda: grid(gs=(4,)), "moe", "2 or more granularities"),
        (lambda: _pts(loss=np.where(np.arange(75) == 3, np.nan, grid().loss)), "moe", "NaN/inf"),
        (lambda: _pts(loss=np.where(np.arange(75) == 3, np.inf, grid().loss)), "moe", "NaN/inf"),
        (lambda: _pts(N=np.where(np.arange(75) == 0, 0.0, grid().N)), "moe", "every N must be a positive"),
        (lambda: _pts(D=-grid().D), "dense", "every D must be a positive"),
        (lambda: _pts(N=np.full(75, 1e9)), "dense", "distinct model sizes"),
        (lambda: grid(gs=(1, 2), jitter=False), "granularity", "3 or more distinct G"),
    ],
)
def test_degenerate_inputs_are_named(make, law, msg):
    with pytest.raises(DataError, match=msg):
        F.fit(make(), law, holdout=None)


def test_bad_options():
    with pytest.raises(DataError, match="cannot fix"):
        F.fit(grid(), "dense", fixed={"gamma": 0.5})
    with pytest.raises(DataError, match="holdout"):
        F.fit(grid(), "moe", holdout=1.5)
    with pytest.raises(DataError, match="space"):
        F.fit(grid(), "moe", space="sqrt")


def test_free_parameter_counts_follow_the_law_and_what_is_fixed():
    assert F.n_free_params("moe") == 7 and F.n_free_params("dense") == 5
    assert F.n_free_params("moe", {"c": 1.5}) == 6 and F.n_free_params("dense", {"c": 1.5, "beta": 0.3}) == 3
    assert F.n_free_params("granularity") == len(F._LAWS["granularity"].names)
    with pytest.raises(DataError, match="unknown law"):
        F.n_free_params("chinchilla")
