"""Compute-optimal planning under the paper's FLOPs model (§5, §6) and the dense comparison (§7).

For a budget F and granularity G the three constraints (F from Eq. 10, N = (8E+4) d^2 n, d = aspect*n)
leave one free variable, d_model. The law is convex in log d (a falling and a rising power), so a
bounded 1-D solver per G finds the optimum; G is then chosen over powers of two, as the paper did.

Size caps (total parameters: what must fit in memory; active parameters: what each token costs at
inference) only lower the upper bound on d_model, which is monotone in both, so the capped optimum
is the same convex search clipped there: a bigger model would be better, the budget goes to tokens.
Every model compared (the MoE, the G=1 MoE, dense) is held to the same caps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from finemoe import accounting as acc
from finemoe.errors import ConfigError
from finemoe.scaling.laws import CoefficientSet, DenseLaw, MoELaw

POW2_G = tuple(2**k for k in range(9))  # 1 .. 256, the paper's search space
LOG_D_BOUNDS = (math.log(1.0), math.log(1e8))
_XATOL = 1e-10

# Table 2 of the paper as printed: (label, N_act target, D, G, FLOPs, loss).
PAPER_TABLE2 = (
    ("64 x 100M", 100e6, 4.37e9, 8, 2.95e18, 3.133),
    ("64 x 1B", 1e9, 28.94e9, 16, 1.93e20, 2.491),
    ("64 x 3B", 3e9, 72.90e9, 16, 1.41e21, 2.245),
    ("64 x 7B", 7e9, 137.60e9, 32, 6.46e21, 2.076),
    ("64 x 70B", 70e9, 941.07e9, 32, 4.16e23, 1.694),
    ("64 x 300B", 300e9, 2.96e12, 64, 5.69e24, 1.503),
    ("64 x 1T", 1e12, 7.94e12, 64, 4.97e25, 1.367),
)


@dataclass(frozen=True)
class Settings:
    """The FLOPs model and search space; defaults are the paper's."""

    expansion_rate: float = 64
    c_f: float = acc.C_F
    c_r: float = acc.C_R
    aspect: float = acc.ASPECT  # d_model = aspect * n_blocks
    granularities: tuple[float, ...] = POW2_G
    continuous_g: bool = False  # search G in [min, max] of `granularities` instead of the listed values
    max_total_params: float | None = None  # non-embedding, router excluded (the paper's N)
    max_active_params: float | None = None

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (self.expansion_rate, self.c_f, self.c_r, self.aspect)):
            raise ConfigError("expansion_rate, c_f, c_r and aspect must be finite numbers")
        if self.expansion_rate < 1 or self.c_f <= 0 or self.c_r < 0 or self.aspect <= 0:
            raise ConfigError("need expansion_rate >= 1, c_f > 0, c_r >= 0 and aspect > 0")
        if not self.granularities or min(self.granularities) < 1:
            raise ConfigError("granularities must be a non-empty list of values >= 1")
        for name in ("max_total_params", "max_active_params"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number of parameters, got {v!r}")

    @property
    def capped(self) -> bool:
        return self.max_total_params is not None or self.max_active_params is not None

    def log_d_max(self, dense: bool = False) -> float:
        """Upper bound on log d_model: the solver's range, lowered by the size caps."""
        bound = LOG_D_BOUNDS[1]
        if self.max_total_params is not None:
            E = 1 if dense else self.expansion_rate
            bound = min(bound, math.log(acc.d_model_for_total(self.max_total_params, E, self.aspect)))
        if self.max_active_params is not None:
            bound = min(bound, math.log(acc.d_model_for_active(self.max_active_params, self.aspect)))
        if bound <= LOG_D_BOUNDS[0]:
            raise ConfigError(
                f"size cap too small: no model with d_model >= 1 has at most {self.caps_text()}"
            )
        return bound

    def fits(self, total_params: float, active_params: float) -> bool:
        return (self.max_total_params is None or total_params <= self.max_total_params) and (
            self.max_active_params is None or active_params <= self.max_active_params
        )

    def caps_text(self) -> str:
        caps = [
            f"{v:.3g} {what} params"
            for v, what in ((self.max_total_params, "total"), (self.max_active_params, "active"))
            if v is not None
        ]
        return " and ".join(caps)


@dataclass(frozen=True)
class Plan:
    """A continuous optimum: d_model and n_blocks are real numbers here; see `architecture`.
    `at_cap`: a size cap binds (without it the optimum would be a bigger model)."""

    flops: float
    granularity: float
    d_model: float
    n_blocks: float
    active_params: float
    total_params: float
    tokens: float
    loss: float
    at_cap: bool = False


def _at_cap(log_d: float, log_d_max: float) -> bool:
    return log_d_max < LOG_D_BOUNDS[1] and log_d >= log_d_max


def _argmin_log_d(f, hi: float) -> float:
    """Bounded Brent over log d in [LOG_D_BOUNDS[0], hi]. It stops ~1e-7 short of a bound, so a
    cap that binds is taken exactly (the loss there is no worse)."""
    x = float(minimize_scalar(f, bounds=(LOG_D_BOUNDS[0], hi), method="bounded", options={"xatol": _XATOL}).x)
    return hi if hi < LOG_D_BOUNDS[1] and x > hi - 1e-5 and f(hi) <= f(x) else x


def _moe_point(law: MoELaw, flops: float, G: float, log_d: float, s: Settings) -> Plan:
    d = math.exp(log_d)
    n = acc.n_blocks_for(d, s.aspect)
    D = acc.tokens_for_flops(flops, d, n, s.expansion_rate, G, s.c_f, s.c_r)
    N = acc.total_params(d, n, s.expansion_rate)
    return Plan(
        flops, G, d, n, acc.active_params(d, n), N, D, float(law.loss(N, D, G)), _at_cap(log_d, s.log_d_max())
    )


def optimum_for_g(law: MoELaw, flops: float, G: float, s: Settings = Settings()) -> Plan:
    """Best d_model for a fixed G and budget (Brent, bounded, in log d)."""
    f = lambda x: float(law.loss(*_nd(flops, G, x, s), G))  # noqa: E731
    return _moe_point(law, flops, G, _argmin_log_d(f, s.log_d_max()), s)


def _nd(flops, G, log_d, s):
    d = math.exp(log_d)
    n = acc.n_blocks_for(d, s.aspect)
    return acc.total_params(d, n, s.expansion_rate), acc.tokens_for_flops(
        flops, d, n, s.expansion_rate, G, s.c_f, s.c_r
    )


def optimum(law: MoELaw, flops: float, s: Settings = Settings()) -> Plan:
    """Compute-optimal (N, D, G) for a budget: best over the G grid, or over continuous G."""
    _check_budget(flops)
    if s.continuous_g:
        lo, hi = math.log(min(s.granularities)), math.log(max(s.granularities))
        if hi - lo < 1e-12:
            return optimum_for_g(law, flops, min(s.granularities), s)
        r = minimize_scalar(
            lambda x: optimum_for_g(law, flops, math.exp(x), s).loss,
            bounds=(lo, hi),
            method="bounded",
            options={"xatol": 1e-6},
        )
        return optimum_for_g(law, flops, math.exp(float(r.x)), s)
    return min((optimum_for_g(law, flops, G, s) for G in s.granularities), key=lambda p: p.loss)


def dense_optimum(law: DenseLaw, flops: float, s: Settings = Settings()) -> Plan:
    """Compute-optimal dense model under Eq. 1, F = c_f N D (= 6 N D), same d = aspect * n shape."""
    _check_budget(flops)

    def point(x):
        d = math.exp(x)
        n = acc.n_blocks_for(d, s.aspect)
        N = acc.total_params(d, n)
        D = acc.tokens_for_flops(flops, d, n, c_f=s.c_f)
        return d, n, N, D

    hi = s.log_d_max(dense=True)
    x = _argmin_log_d(lambda x: float(law.loss(*point(x)[2:])), hi)
    d, n, N, D = point(x)
    return Plan(flops, 0, d, n, N, N, D, float(law.loss(N, D)), _at_cap(x, hi))


def flops_to_reach(loss_at, target: float, start: float) -> float:
    """Smallest budget whose optimal loss is `target`; loss_at(F) must fall with F. inf if unreachable."""
    lo = hi = math.log(start)
    if loss_at(math.exp(lo)) < target:
        while loss_at(math.exp(lo)) < target:
            lo -= 2.0
    else:
        while loss_at(math.exp(hi)) > target:
            hi += 2.0
            if hi > math.log(start) + 120:  # 1e52 x the budget: the target is below the law's floor
                return math.inf
    return math.exp(brentq(lambda x: loss_at(math.exp(x)) - target, lo, hi, xtol=1e-10, rtol=1e-12))


@dataclass(frozen=True)
class Comparison:
    moe: Plan
    dense: Plan | None  # the dense optimum at the same budget
    dense_flops_multiple: float | None  # dense FLOPs to match the MoE optimum's loss / F
    g1: Plan  # G = 1 MoE optimum at the same budget
    g1_flops_multiple: float


def compare(coeffs: CoefficientSet, flops: float, s: Settings = Settings()) -> Comparison:
    check_plannable(flops, s)
    moe_law = coeffs.require("moe")
    best = optimum(moe_law, flops, s)
    s1 = replace(s, granularities=(1,), continuous_g=False)
    g1 = optimum(moe_law, flops, s1)
    g1_mult = flops_to_reach(lambda F: optimum(moe_law, F, s1).loss, best.loss, flops) / flops
    dense = mult = None
    if coeffs.dense is not None:
        dense = dense_optimum(coeffs.dense, flops, s)
        mult = flops_to_reach(lambda F: dense_optimum(coeffs.dense, F, s).loss, best.loss, flops) / flops
    return Comparison(best, dense, mult, g1, g1_mult)


def optimum_for_active(law: MoELaw, n_act: float, s: Settings = Settings()) -> Plan:
    """Table 2 mode: the budget whose compute-optimal model has `n_act` active parameters.

    The optimal d_model grows with F but jumps where the best G changes; Brent's root finder on log F
    then lands on the jump, which is where the paper's bisection lands too.
    """
    if not n_act > 0:
        raise ConfigError(f"active parameter target must be positive, got {n_act}")
    target = math.log(acc.d_model_for_active(n_act, s.aspect))
    # Chinchilla-like guess F ~ 6 * N_act * 20 N_act brackets the root within a few doublings.
    lo = hi = math.log(6 * n_act * 20 * n_act)
    h = lambda x: math.log(optimum(law, math.exp(x), s).d_model) - target  # noqa: E731
    while h(lo) > 0:
        lo -= 2.0
    while h(hi) < 0:
        hi += 2.0
        if hi > lo + 200:
            raise ConfigError(
                f"no budget gives an optimum with {n_act:.3g} active params under these coefficients"
            )
    x = brentq(h, lo, hi, xtol=1e-12, rtol=1e-14)
    return optimum(law, math.exp(x), s)


MAX_BUDGET = 1e35  # beyond any training run; past it the optimisers' exponentials overflow


def _check_budget(flops: float) -> None:
    if not (isinstance(flops, (int, float, np.floating)) and math.isfinite(flops) and flops > 0):
        raise ConfigError(f"FLOPs budget must be a positive finite number, got {flops!r}")


def check_plannable(flops: float, s: Settings) -> None:
    """A budget the planner can answer: finite, and enough for one token of the smallest model it
    builds (one block of d_model 64, G=1), and at most MAX_BUDGET, so `plan` and `savings` accept and
    refuse the same budgets. (Internal searches, such as the dense multiple's, may go past the cap.)"""
    _check_budget(flops)
    if flops > MAX_BUDGET:
        raise ConfigError(f"FLOPs budget {flops:.3g} is beyond {MAX_BUDGET:.0e}; plan for a budget below it")
    smallest = acc.flops_per_token(64, 1, s.expansion_rate, 1, s.c_f, s.c_r)
    if flops < smallest:
        raise ConfigError(
            f"budget {flops:.3g} FLOPs cannot train even one token of the smallest buildable model "
            f"({smallest:.3g} FLOPs per token); raise --flops"
        )


# --- concrete architecture -------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    d_model: int
    n_blocks: int
    n_heads: int
    granularity: int
    n_experts: int
    expert_width: int
    active_params: int
    total_params: int
    tokens: int
    flops: float
    loss: float


def _pow2_near(g: float) -> int:
    return int(2 ** round(math.log2(max(g, 1.0))))


def _deepest_under_caps(d: int, E: int, s: Settings) -> list[int]:
    """With a size cap, the most blocks a d_model-wide model may have (if at least one): rounding the
    shape down to d/aspect blocks alone can leave much of the cap unused."""
    if not s.capped:
        return []
    n = min(
        math.floor(c / per_block)
        for c, per_block in (
            (s.max_total_params, acc.total_params(d, 1, E)),
            (s.max_active_params, acc.active_params(d, 1)),
        )
        if c is not None
    )
    return [n] if n >= 1 else []


def architecture(
    law: MoELaw, plan: Plan, s: Settings = Settings(), head_dim: int = 64, ff_mult: int = 4
) -> Architecture:
    """Round a continuous plan to a model one can build, spending the same budget.

    d_model is a multiple of head_dim (n_heads = d_model / head_dim) and makes the expert width
    ff_mult*d_model/G a multiple of 8; n_blocks is an integer near d_model/aspect, or under a size
    cap the most that fit. A continuous G is rounded to the nearest power of two.
    Among the neighbouring choices the one with the lowest predicted loss wins; tokens are what the
    budget buys for that model, and loss and FLOPs are recomputed for it.
    """
    E = int(round(s.expansion_rate))
    G = int(round(plan.granularity)) if float(plan.granularity).is_integer() else _pow2_near(plan.granularity)
    # expert width ff_mult*d/G must be a multiple of 8: d must be a multiple of 8G/gcd(8G, ff_mult)
    q_w = 8 * G // math.gcd(8 * G, ff_mult)
    q = head_dim * q_w // math.gcd(head_dim, q_w)
    cands = []
    d_lo = max(q, int(plan.d_model // q) * q)
    for d in {d_lo, d_lo + q}:
        n0 = d / s.aspect
        for n in {max(1, math.floor(n0)), max(1, math.ceil(n0)), *_deepest_under_caps(d, E, s)}:
            fpt = acc.flops_per_token(d, n, E, G, s.c_f, s.c_r)
            D = int(plan.flops // fpt)
            if D < 1:
                continue
            N = acc.total_params(d, n, E)
            if s.fits(N, acc.active_params(d, n)):
                cands.append((float(law.loss(N, D, G)), d, n, D, fpt, N))
    if not cands and s.capped and plan.flops // acc.flops_per_token(q, 1, E, G, s.c_f, s.c_r) >= 1:
        raise ConfigError(
            f"no buildable G={G} model (d_model a multiple of {q}) has at most {s.caps_text()}; "
            "raise the cap or search smaller G with --granularities"
        )
    if not cands:
        raise ConfigError(
            f"budget {plan.flops:.3g} FLOPs cannot train even one token of the smallest buildable model"
        )
    loss, d, n, D, fpt, N = min(cands)
    return Architecture(
        d_model=d,
        n_blocks=n,
        n_heads=d // head_dim,
        granularity=G,
        n_experts=E * G,
        expert_width=ff_mult * d // G,
        active_params=int(acc.active_params(d, n)),
        total_params=int(N),
        tokens=D,
        flops=float(fpt * D),
        loss=loss,
    )


# --- choosing E among sets fitted at one E each (`plan --search-e`) --------------------------------


def optimum_over_e(candidates, flops: float) -> tuple[int, list[Plan | str]]:
    """The best of several (CoefficientSet, Settings) pairs, one per E, and each one's own optimum.

    Eq. 9 has no E in it: a set is fitted at one E (the paper's at E=64, its Table 8 at E=16), so
    choosing E means comparing each set's optimum under its own Settings (its E and its caps). A pair
    whose caps leave no model is reported by its reason instead of a Plan; ties go to the smaller E.
    """
    results: list[Plan | str] = []
    for coeffs, s in candidates:
        check_plannable(flops, s)
        try:
            s.log_d_max()
        except ConfigError as e:
            results.append(str(e))
            continue
        results.append(optimum(coeffs.require("moe"), flops, s))
    ok = [i for i, r in enumerate(results) if isinstance(r, Plan)]
    if not ok:
        raise ConfigError(f"no expansion rate searched has a model under the caps: {results[0]}")
    best = min(ok, key=lambda i: (round(results[i].loss, 12), candidates[i][1].expansion_rate))
    return best, results
