"""Fitting the laws to runs: robust (Huber) loss, every parameter positive, several starts, bootstrap.

Why these choices:
- Every coefficient and exponent is optimised as its logarithm, so it is positive by construction
  and the optimiser needs no bounds.
- The objective is the Huber loss SUMMED over runs (Hoffmann et al.; the paper, §4). The default is the
  paper's: delta = 0.1 on the loss itself, which for residuals of ~0.01-0.02 is least squares with
  protection against diverged runs. `space="log"` with delta=1e-3 gives Chinchilla's variant.
- The paper started BFGS once from all-ones; one start can stop in a poor basin, so we score a grid of
  starts cheaply and polish the best few with L-BFGS-B and an analytic gradient, keeping the best.
- Optional regulariser as the paper's code: weight_decay * sum |p| over the free parameters in that
  code's parametrisation (logs of the coefficients g, a, b, c, h; the exponents as they are), added to the
  summed Huber loss. Off by default: the paper's text (5e-4) and code (5e-5 MoE, 1e-5 dense) disagree.
- Validation as the paper: refit without the best `holdout` fraction of runs (lowest loss) and report
  the RMSE on those extrapolated runs. Bootstrap refits start from the full fit (warm start).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from finemoe.errors import DataError
from finemoe.scaling.laws import DenseLaw, GranularityLaw, MoELaw
from finemoe.scaling.trust import data_range, fit_flags

LAWS = ("moe", "dense", "granularity")


# --- law definitions: parameter names, prediction and its Jacobian wrt log-parameters -------------


@dataclass(frozen=True)
class _Law:
    names: tuple[str, ...]
    grid: dict[str, tuple[float, ...]]  # starting values per parameter (natural scale)
    predict: Callable[[np.ndarray, dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
    cls: type


def _moe_predict(p, X):
    g, gamma, a, alpha, b, beta, c = p
    u = np.exp(-gamma * X["logG"])
    v = np.exp(-alpha * X["logN"])
    w = np.exp(-beta * X["logD"])
    A = g * u + a
    L = c + A * v + b * w
    # d L / d log p = p * d L / d p
    J = np.stack(
        [
            g * u * v,
            -gamma * g * u * X["logG"] * v,
            a * v,
            -alpha * A * v * X["logN"],
            b * w,
            -beta * b * w * X["logD"],
            np.full_like(L, c),
        ],
        axis=1,
    )
    return L, J


def _dense_predict(p, X):
    a, alpha, b, beta, c = p
    v = np.exp(-alpha * X["logN"])
    w = np.exp(-beta * X["logD"])
    L = c + a * v + b * w
    J = np.stack(
        [a * v, -alpha * a * v * X["logN"], b * w, -beta * b * w * X["logD"], np.full_like(L, c)], axis=1
    )
    return L, J


def _gran_predict(p, X):
    g, gamma, h = p
    u = np.exp(-gamma * X["logG"])
    L = g * u + h
    J = np.stack([g * u, -gamma * g * u * X["logG"], np.full_like(L, h)], axis=1)
    return L, J


_LAWS = {
    "moe": _Law(
        ("g", "gamma", "a", "alpha", "b", "beta", "c"),
        {
            "g": (0.5, 3.0),
            "gamma": (0.2, 0.8),
            "a": (5.0, 30.0),
            "alpha": (0.08, 0.25),
            "b": (5.0, 50.0),
            "beta": (0.08, 0.25),
            "c": (0.3, 1.2),
        },
        _moe_predict,
        MoELaw,
    ),
    "dense": _Law(
        ("a", "alpha", "b", "beta", "c"),
        {
            "a": (2.0, 10.0, 50.0),
            "alpha": (0.05, 0.15, 0.35),
            "b": (2.0, 10.0, 50.0),
            "beta": (0.05, 0.15, 0.35),
            "c": (0.3, 1.0, 1.7),
        },
        _dense_predict,
        DenseLaw,
    ),
    "granularity": _Law(
        ("g", "gamma", "h"),
        {"g": (0.05, 0.3, 1.0), "gamma": (0.2, 0.6, 1.2), "h": (0.5, 2.0, 3.0)},
        _gran_predict,
        GranularityLaw,
    ),
}


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Points:
    """What a fit sees: total params N, tokens D, granularity G (1 for dense) and the observed loss.

    Optional: each run's FLOPs (how far a plan extrapolates is measured against them) and its group,
    the runs that must be resampled together (a stable run and its cooldown branches share one).
    """

    N: np.ndarray
    D: np.ndarray
    G: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None
    group: np.ndarray | None = None
    budget: np.ndarray | None = None  # an iso-FLOP sweep's compute budget per run (NaN: none)

    def __post_init__(self):
        names = ("N", "D", "G", "loss", "flops", "budget")
        arrs = {k: np.asarray(getattr(self, k), float) for k in names if getattr(self, k) is not None}
        if len({a.shape for a in arrs.values()}) != 1 or arrs["N"].ndim != 1:
            raise DataError("N, D, G, loss (and flops, budget) must be 1-D arrays of the same length")
        for k, a in arrs.items():
            object.__setattr__(self, k, a)
        group = np.arange(len(arrs["N"])) if self.group is None else np.asarray(self.group)
        if group.shape != arrs["N"].shape:
            raise DataError("group must give one label per run")
        object.__setattr__(self, "group", group)

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, idx) -> "Points":
        return Points(
            self.N[idx],
            self.D[idx],
            self.G[idx],
            self.loss[idx],
            None if self.flops is None else self.flops[idx],
            self.group[idx],
            None if self.budget is None else self.budget[idx],
        )

    def largest_budget(self) -> np.ndarray:
        """Indices of the runs at the largest compute budget (an iso-FLOP sweep's), to hold out."""
        if self.budget is None or not np.isfinite(self.budget).any():
            raise DataError(
                "no run has a compute budget: holding out the largest budget needs an iso-FLOP sweep's "
                "results"
            )
        return np.flatnonzero(self.budget == np.nanmax(self.budget))

    def features(self) -> dict[str, np.ndarray]:
        return {"logN": np.log(self.N), "logD": np.log(self.D), "logG": np.log(self.G)}


def n_free_params(law: str, fixed: dict[str, float] | None = None) -> int:
    """Parameters a fit of `law` estimates: the law's coefficients less those held `fixed`."""
    if law not in LAWS:
        raise DataError(f"unknown law {law!r}; choose one of {list(LAWS)}")
    names = _LAWS[law].names
    return len(names) - sum(k in names for k in (fixed or {}))


def validate(pts: Points, law: str, fixed: dict[str, float]) -> None:
    """Reject inputs that cannot identify the law, each with the reason and the fix."""
    n_free = n_free_params(law, fixed)  # rejects an unknown law first
    bad = ~np.isfinite(pts.loss)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise DataError(
            f"{int(bad.sum())} run(s) have a NaN/inf loss (rows {rows}...); drop diverged runs or mark them "
            "failed"
        )
    if (pts.loss <= 0).any():
        raise DataError("losses must be positive (cross-entropy in nats); check the loss column")
    for k in ("N", "D", "G"):
        a = getattr(pts, k)
        if not np.all(np.isfinite(a)) or (a <= 0).any():
            raise DataError(
                f"every {k} must be a positive finite number; {int((~(np.isfinite(a) & (a > 0))).sum())} are "
                "not"
            )
    if law != "dense" and (pts.G < 1).any():
        raise DataError("granularity must be >= 1")
    if len(pts) <= n_free:
        raise DataError(
            f"{len(pts)} run(s) cannot fit the {law} law's {n_free} free parameters; need at least "
            f"{n_free + 1}"
        )
    distinct = lambda a: len(np.unique(a))  # noqa: E731
    if law in ("moe", "granularity") and distinct(pts.G) < 2:
        raise DataError(
            f"the {law} law needs runs at 2 or more granularities to identify g and gamma; got only "
            f"G={pts.G[0]:g}"
        )
    if law in ("moe", "dense"):
        if distinct(pts.N) < 2 or distinct(pts.D) < 2:
            raise DataError(
                f"the {law} law needs 2 or more distinct model sizes N and token counts D to identify alpha "
                "and beta"
            )


# --- the objective ---------------------------------------------------------------------------------


def huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber value and derivative, elementwise."""
    a = np.abs(r)
    quad = a <= delta
    return np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta)), np.clip(r, -delta, delta)


EXPONENTS = ("gamma", "alpha", "beta")


@dataclass(frozen=True)
class Objective:
    """What is minimised: Huber(delta) of the residuals in `space`, plus weight_decay * sum |p|."""

    delta: float = 0.1
    space: str = "loss"
    weight_decay: float = 0.0


def _objective(law: _Law, X, y, free: np.ndarray, theta_full: np.ndarray, obj: Objective):
    logy = np.log(y)
    is_exp = np.array([k in EXPONENTS for k in law.names])

    def f(theta):
        t = theta_full.copy()
        t[free] = theta
        with np.errstate(over="ignore", invalid="ignore"):  # line searches probe extreme exponents
            return _value_and_grad(t)

    def _value_and_grad(t):
        L, J = law.predict(np.exp(t), X)
        if obj.space == "log":
            Lc = np.maximum(L, 1e-300)
            r = np.log(Lc) - logy
            J = J / Lc[:, None]
        else:
            r = L - y
        h, dh = huber(r, obj.delta)
        value, grad = float(h.sum()), dh @ J[:, free]
        if obj.weight_decay:
            p = np.where(is_exp, np.exp(t), t)  # d|p|/dt: exp(t) for exponents, sign(t) for log-coefficients
            value += obj.weight_decay * float(np.abs(p[free]).sum())
            grad = grad + obj.weight_decay * np.where(is_exp, np.exp(t), np.sign(t))[free]
        return value, grad

    return f


@dataclass
class FitResult:
    law: str
    params: dict[str, float]
    fixed: dict[str, float]
    n_points: int
    rmse: float  # in-sample, on the loss itself
    objective: float
    huber_delta: float
    space: str
    predicted: np.ndarray
    observed: np.ndarray
    holdout: dict[str, Any] | None = None
    bootstrap: dict[str, Any] | None = None
    groups: list[dict[str, Any]] = field(default_factory=list)  # granularity law: one fit per (N, D)
    weight_decay: float = 0.0
    data: dict[str, float] = field(default_factory=dict)  # the span of the fitted runs (trust.data_range)
    flags: list[str] = field(
        default_factory=list
    )  # why the fit is degenerate (trust.fit_flags); empty if not

    def model(self):
        return _LAWS[self.law].cls(**{**self.fixed, **self.params})

    def to_dict(self, draws: bool = False) -> dict[str, Any]:
        """Everything a reader needs; the bootstrap's coefficient draws only with draws=True (they are
        long)."""
        out = {
            "law": self.law,
            "coefficients": self.params,
            "fixed": sorted(self.fixed),
            "n_points": self.n_points,
            "rmse": self.rmse,
            "huber_delta": self.huber_delta,
            "space": self.space,
            "weight_decay": self.weight_decay,
            "data": self.data,
            "flags": self.flags,
            "degenerate": bool(self.flags),
        }
        if self.holdout is not None:
            out["holdout"] = {
                k: v for k, v in self.holdout.items() if k not in ("predicted", "observed", "index")
            }
        if self.bootstrap is not None:
            out["bootstrap"] = {k: v for k, v in self.bootstrap.items() if draws or k != "draws"}
        if self.groups:
            out["groups"] = self.groups
        return out


def _starts(law: _Law, fixed: dict[str, float]) -> np.ndarray:
    axes = [(fixed[k],) if k in fixed else law.grid[k] for k in law.names]
    return np.log(np.array(list(itertools.product(*axes)), float))


def _solve(
    law: _Law, pts: Points, fixed: dict[str, float], obj: Objective, starts: np.ndarray, n_polish: int
) -> tuple[np.ndarray, float]:
    X, y = pts.features(), pts.loss
    free = np.array([k not in fixed for k in law.names])
    base = np.array([math.log(fixed.get(k, 1.0)) for k in law.names])
    f = _objective(law, X, y, free, base, obj)
    if len(starts) > n_polish:  # score the grid, polish only the most promising starts
        scores = np.array([f(s[free])[0] for s in starts])
        starts = starts[np.argsort(scores)[:n_polish]]
    best_t, best_v = None, math.inf
    for s in starts:
        r = minimize(
            f,
            s[free],
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 20},
        )
        if np.all(np.isfinite(r.x)) and r.fun < best_v:
            best_t, best_v = r.x, float(r.fun)
    if best_t is None:
        raise DataError("the fit diverged from every starting point; check that the losses fall with N and D")
    t = base.copy()
    t[free] = best_t
    return t, best_v


def _predict(law: _Law, theta: np.ndarray, pts: Points) -> np.ndarray:
    return law.predict(np.exp(theta), pts.features())[0]


def _single_threaded(fn):
    """Thousands of tiny solves: threaded BLAS inside L-BFGS-B only adds contention (much slower on a
    busy machine), so run single-threaded; bootstrap refits are the unit of parallelism, not BLAS."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with threadpool_limits(1):
            return fn(*args, **kwargs)

    return run


def _rmse(pred, obs) -> float:
    return float(np.sqrt(np.mean((pred - obs) ** 2)))


@_single_threaded
def fit(
    pts: Points,
    law: str = "moe",
    *,
    fixed: dict[str, float] | None = None,
    huber_delta: float = 0.1,
    space: str = "loss",
    weight_decay: float = 0.0,
    n_polish: int = 8,
    holdout: float | np.ndarray | None = 0.2,
    bootstrap: int = 0,
    bootstrap_fraction: float = 0.8,
    percentiles: Sequence[float] = (10, 90),
    seed: int = 0,
    derived: Callable[[Any], dict[str, float]] | None = None,
) -> FitResult:
    """Fit one law. `holdout` is the fraction of best runs refitted without and scored, or the indices
    of the runs to hold out (e.g. `pts.largest_budget()`). `derived(law_object)` maps a fitted law to
    named quantities (e.g. optimal G at a budget) whose bootstrap percentiles are reported beside the
    coefficients'."""
    fixed = dict(fixed or {})
    if space not in ("loss", "log"):
        raise DataError(f"space must be 'loss' or 'log', got {space!r}")
    if not huber_delta > 0:
        raise DataError(f"huber delta must be positive, got {huber_delta}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise DataError(f"weight decay must be >= 0, got {weight_decay}")
    obj = Objective(huber_delta, space, weight_decay)
    if law == "granularity":
        return _fit_groups(pts, fixed, obj, n_polish)
    validate(pts, law, fixed)
    spec = _LAWS[law]
    unknown = set(fixed) - set(spec.names)
    if unknown:
        raise DataError(f"cannot fix {sorted(unknown)}: the {law} law's parameters are {list(spec.names)}")
    for k, v in fixed.items():
        if not (math.isfinite(v) and v > 0):
            raise DataError(f"fixed {k}={v} must be positive (parameters are positive by construction)")
    theta, value = _solve(spec, pts, fixed, obj, _starts(spec, fixed), n_polish)
    pred = _predict(spec, theta, pts)
    res = FitResult(
        law,
        _named(spec, theta, fixed),
        fixed,
        len(pts),
        _rmse(pred, pts.loss),
        value,
        huber_delta,
        space,
        pred,
        pts.loss.copy(),
        weight_decay=weight_decay,
    )

    if holdout is not None and (np.ndim(holdout) or holdout):
        res.holdout = _holdout(spec, pts, fixed, obj, theta, holdout, law)
    if bootstrap:
        res.bootstrap = _bootstrap(
            spec, law, pts, fixed, obj, theta, bootstrap, bootstrap_fraction, percentiles, seed, derived
        )
    res.data = data_range(pts.N, pts.D, pts.flops)
    res.flags = fit_flags(res.params, list(fixed), res.bootstrap, float(pts.loss.min()))
    return res


def _named(spec: _Law, theta: np.ndarray, fixed: dict[str, float] | None = None) -> dict[str, float]:
    """Coefficients by name; fixed ones exactly as given, not through exp(log(x))."""
    return {k: float(v) for k, v in zip(spec.names, np.exp(theta))} | (fixed or {})


def _holdout(spec, pts, fixed, obj, theta, holdout, law) -> dict[str, Any]:
    if np.ndim(holdout):
        test = np.asarray(holdout, int)
        frac, what = len(test) / len(pts), f"the {len(test)} runs asked for"
        if not 0 < len(test) < len(pts):
            raise DataError(
                f"holding out {len(test)} of {len(pts)} runs leaves nothing to fit or to validate on"
            )
    else:
        frac = holdout
        if not 0 < frac < 1:
            raise DataError(f"--holdout-best must be a fraction in (0, 1), got {frac}")
        k = int(round(frac * len(pts)))
        if k < 1:
            raise DataError(
                f"holding out {frac:.0%} of {len(pts)} runs leaves nothing to validate on; use more runs"
            )
        test, what = np.argsort(pts.loss)[:k], f"the best {frac:.0%} of runs"
    train = np.setdiff1d(np.arange(len(pts)), test)
    k = len(test)
    tr = pts.take(train)
    try:
        validate(tr, law, fixed)
    except DataError as e:
        raise DataError(f"after holding out {what}: {e}") from None
    starts = np.vstack([theta[None, :], _starts(spec, fixed)])
    t, _ = _solve(spec, tr, fixed, obj, starts, 4)
    te = pts.take(test)
    pred = _predict(spec, t, te)
    return {
        "fraction": frac,
        "held_out": "given" if np.ndim(holdout) else "best",
        "n_heldout": int(k),
        "rmse": _rmse(pred, te.loss),
        "coefficients": _named(spec, t, fixed),
        "train_rmse": _rmse(_predict(spec, t, tr), tr.loss),
        "predicted": pred,
        "observed": te.loss,
        "index": test,
    }


def _bootstrap(spec, law, pts, fixed, obj, theta, n, frac, percentiles, seed, derived) -> dict[str, Any]:
    """Refits on resamples of whole groups with replacement (the paper's code resamples runs; a group is
    a run unless branches share a stable run), each resample `frac` of the groups."""
    rng = np.random.default_rng(seed)
    # groups in order of first appearance: with one run per group this resamples exactly as the
    # paper's code does (the same draws from the same seed)
    labels, first, members = np.unique(pts.group, return_index=True, return_inverse=True)
    order = np.argsort(first)
    by_group = [np.flatnonzero(members == i) for i in order]
    size = max(1, int(round(frac * len(labels))))
    rows: list[dict[str, float]] = []
    draws: list[dict[str, float]] = []
    skipped = 0
    for _ in range(n):
        sample = pts.take(np.concatenate([by_group[i] for i in rng.integers(0, len(labels), size)]))
        try:
            validate(sample, law, fixed)
            t, _ = _solve(spec, sample, fixed, obj, theta[None, :], 1)
        except DataError:
            skipped += 1
            continue
        row = _named(spec, t, fixed)
        draws.append(dict(row))
        if derived is not None:
            row.update(derived(spec.cls(**row)))
        rows.append(row)
    if not rows:
        raise DataError(
            "every bootstrap resample was degenerate; use more runs or a larger --bootstrap-fraction"
        )
    keys = list(rows[0])
    table = {k: np.array([r[k] for r in rows], float) for k in keys}
    return {
        "n": len(rows),
        "skipped": skipped,
        "fraction": frac,
        "percentiles": list(percentiles),
        "resampled": "groups" if len(labels) < len(pts) else "runs",
        "n_groups": int(len(labels)),
        "values": {k: [float(np.percentile(v, q)) for q in percentiles] for k, v in table.items()},
        "draws": draws,
    }


def _fit_groups(pts, fixed, obj: Objective, n_polish) -> FitResult:
    """Eq. 4: one (g, gamma, h) per (N, D) pair that has runs at 3 or more granularities."""
    validate(pts, "granularity", fixed)
    spec = _LAWS["granularity"]
    keys = np.stack([pts.N, pts.D], axis=1)
    groups, pred = [], np.full(len(pts), np.nan)
    for N, D in np.unique(keys, axis=0):
        idx = np.flatnonzero((pts.N == N) & (pts.D == D))
        sub = pts.take(idx)
        if len(np.unique(sub.G)) < 3:
            continue
        theta, _ = _solve(spec, sub, fixed, obj, _starts(spec, fixed), n_polish)
        p = _predict(spec, theta, sub)
        pred[idx] = p
        groups.append(
            {
                "N": float(N),
                "D": float(D),
                "n_points": int(len(idx)),
                **_named(spec, theta, fixed),
                "rmse": _rmse(p, sub.loss),
            }
        )
    if not groups:
        raise DataError(
            "the granularity law needs an (N, D) pair with runs at 3 or more distinct G; none has"
        )
    used = np.isfinite(pred)
    res = FitResult(
        "granularity",
        {},
        fixed,
        int(used.sum()),
        _rmse(pred[used], pts.loss[used]),
        math.nan,
        obj.delta,
        obj.space,
        pred[used],
        pts.loss[used],
        groups=groups,
        weight_decay=obj.weight_decay,
    )
    return res
