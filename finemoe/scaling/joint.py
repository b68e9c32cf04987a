"""The Joint MoE scaling law (Ludziejewski et al. 2025, arXiv 2502.05172) and the choice of E under a
memory cap. Pure floats and numpy, no torch.

  L(N_act, D, E) = a Ê^δ N_act^(α + γ ln Ê) + b Ê^ω D^(β + ζ ln Ê) + c       (their Eq. 1 and Eq. 6)
  1/Ê = 1/(E - 1 + (1/E_start - 1/E_max)^-1) + 1/E_max                      (their Eq. 4, after Clark et al.)

At a fixed E it is a Chinchilla law m N_act^μ + n D^ν + c (their Table 4), so the compute-optimal
(N_act, D) has a closed form (their Eq. 7). The paper's conventions differ from Eq. 9 of the
fine-grained paper, and this module keeps them:
- N_act and N_total count the embedding and unembedding (their App. A.1). With d = d_model,
  n = n_blocks = d / 64 (App. A.3) and V = 50,257 (GPT-2): N_act = 2 d V + 13 n d^2 and
  N_total = 2 d V + (4 + 9E) n d^2 (their Eqs. 10 and 9: SwiGLU of width 3d, Switch top-1, G = 1).
- Training FLOPs F = 6 N_act D, routing neglected (App. A.2).
- Memory (their Table 2): bytes per parameter x (N_total + 2 T n d) with T tokens in the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import brentq

from finemoe import accounting as acc
from finemoe.errors import ConfigError
from finemoe.scaling.laws import law_from_dict, read_coefficients_json
from finemoe.scaling.plan import MAX_BUDGET, _check_budget

VOCAB = 50_257  # GPT-2, the paper's tokenizer
ASPECT = 64.0  # n_blocks = n_heads = d_model / 64
MIN_D_MODEL = 64.0  # one head, one block: the smallest model the planner builds
BF16 = 2.0
PAPER_RATES = (1, 2, 4, 8, 16, 32)  # the E the paper trained, and searched in its Table 2
PUBLISHED_JOINT = ("joint",)


@dataclass(frozen=True)
class JointLaw:
    """Eq. 6 of the paper; the exponents α, β are negative as printed (loss falls with size)."""

    a: float
    alpha: float
    delta: float
    gamma: float
    b: float
    beta: float
    omega: float
    zeta: float
    e_start: float
    e_max: float
    c: float

    def e_hat(self, E):
        """Clark et al.'s saturating transform: Ê(1) = E_start, Ê grows ~E, then saturates at E_max."""
        E = np.asarray(E, float)
        k = 1.0 / (1.0 / self.e_start - 1.0 / self.e_max)
        return 1.0 / (1.0 / (E - 1.0 + k) + 1.0 / self.e_max)

    def reduced(self, E: float) -> tuple[float, float, float, float]:
        """(m, μ, n, ν): the Chinchilla law L = m N_act^μ + n D^ν + c this is at a fixed E (their Table 4)."""
        e = float(self.e_hat(E))
        le = math.log(e)
        return (
            self.a * e**self.delta,
            self.alpha + self.gamma * le,
            self.b * e**self.omega,
            self.beta + self.zeta * le,
        )

    def loss(self, n_act, tokens, E):
        N, D, e = np.asarray(n_act, float), np.asarray(tokens, float), self.e_hat(E)
        le = np.log(e)
        with np.errstate(over="ignore"):
            return (
                self.a * e**self.delta * N ** (self.alpha + self.gamma * le)
                + self.b * e**self.omega * D ** (self.beta + self.zeta * le)
                + self.c
            )


@dataclass(frozen=True)
class JointSet:
    """A named joint law with where it comes from; `reduced` holds the paper's Table 4 rows
    (E, m, μ, n, ν) as printed, to check the joint form against."""

    name: str
    law: JointLaw
    source: str = ""
    reduced: tuple[tuple[float, float, float, float, float], ...] = ()
    fitted_range: dict[str, Any] = field(default_factory=dict, compare=False)


def joint_from_dict(data: Any, where: str = "coefficients") -> JointSet:
    law = data.get("joint") if isinstance(data, dict) else None
    if not isinstance(law, dict):
        names = [f.name for f in fields(JointLaw)]
        raise ConfigError(f"{where}: expected a JSON object with a 'joint' law holding {names}")
    law = law_from_dict(JointLaw, law, f"{where}: joint law", signed=True)
    if min(law.a, law.b, law.c) <= 0:
        raise ConfigError(f"{where}: a, b and c must be positive (the law's terms are losses)")
    if not 0 < law.e_start < law.e_max:
        raise ConfigError(f"{where}: need 0 < e_start < e_max for the transform Ê (their Eq. 4)")
    try:
        rows = (data.get("reduced") or {}).get("rows", [])
        reduced = tuple(tuple(float(r[k]) for k in ("E", "m", "mu", "n", "nu")) for r in rows)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: 'reduced' must hold rows of numbers E, m, mu, n, nu") from None
    return JointSet(
        name=str(data.get("name", where)),
        law=law,
        source=str(data.get("source", "")),
        reduced=reduced,
        fitted_range=data["fitted_range"] if isinstance(data.get("fitted_range"), dict) else {},
    )


def load_joint(spec: str = "joint") -> JointSet:
    """The paper's Table 3 (`joint`) or a JSON file of the same form (a 'joint' object)."""
    return joint_from_dict(*read_coefficients_json(spec, PUBLISHED_JOINT, "joint coefficients"))


# --- the paper's model family and memory -----------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The paper's model family (App. A): its vocabulary and n_blocks = d_model / aspect."""

    vocab: float = VOCAB
    aspect: float = ASPECT


def active_params(d, shape: Shape = Shape()):
    """Their Eq. 10: embeddings plus 4d^2 of attention and 9d^2 of SwiGLU per block."""
    return 2 * d * shape.vocab + 13 * d**3 / shape.aspect


def total_params(d, E, shape: Shape = Shape()):
    """Their Eq. 9: every block holds E experts of 9d^2 each."""
    return 2 * d * shape.vocab + nonembedding_total(d, E, shape)


def nonembedding_total(d, E, shape: Shape = Shape()):
    return (4 + 9 * E) * d**3 / shape.aspect


def nonembedding_active(d, shape: Shape = Shape()):
    return 13 * d**3 / shape.aspect


def memory_bytes(d, nonembedding, kv_tokens=0.0, bytes_per_param=BF16, shape: Shape = Shape()):
    """Weights with the (un)embedding plus a KV cache of 2 T n d entries, as the paper's Table 2 counts
    inference memory; `nonembedding` is the law family's own count at this d."""
    return bytes_per_param * (2 * d * shape.vocab + nonembedding + 2 * kv_tokens * d * d / shape.aspect)


_LOG_D = (math.log(1e-6), math.log(1e9))


def _d_at(count: Callable[[float], float], limit: float) -> float:
    """The d_model at which a count that grows with d reaches `limit` (Brent on log d)."""
    g = lambda x: math.log(count(math.exp(x))) - math.log(limit)  # noqa: E731
    lo, hi = _LOG_D
    if g(hi) <= 0:
        return math.exp(hi)
    if g(lo) >= 0:
        return math.exp(lo)
    return math.exp(brentq(g, lo, hi, xtol=1e-13, rtol=1e-15))


def d_model_for_active(n_act: float, shape: Shape = Shape()) -> float:
    return _d_at(lambda d: active_params(d, shape), n_act)


@dataclass(frozen=True)
class Caps:
    """What must fit. `memory`: bytes of weights and KV cache, at `bytes_per_param` each with
    `kv_tokens` cached. `max_total_params` and `max_active_params` count without embeddings, as
    `--max-total-params` and `--max-active-params` do for Eq. 9."""

    memory: float | None = None
    kv_tokens: float = 0.0
    bytes_per_param: float = BF16
    max_total_params: float | None = None
    max_active_params: float | None = None

    def __post_init__(self):
        for name in ("memory", "max_total_params", "max_active_params"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        if not (math.isfinite(self.kv_tokens) and self.kv_tokens >= 0):
            raise ConfigError(f"kv_tokens must be a finite number >= 0, got {self.kv_tokens!r}")
        if not (math.isfinite(self.bytes_per_param) and self.bytes_per_param > 0):
            raise ConfigError(f"bytes_per_param must be positive, got {self.bytes_per_param!r}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.max_total_params, self.max_active_params))

    def text(self) -> str:
        parts = []
        if self.memory is not None:
            kv = f" with {self.kv_tokens:g} KV-cache tokens" if self.kv_tokens else ""
            parts.append(f"{self.memory / 1e9:.4g} GB at {self.bytes_per_param:g} bytes per param{kv}")
        parts += [
            f"{v:.3g} {what} non-embedding params"
            for v, what in ((self.max_total_params, "total"), (self.max_active_params, "active"))
            if v is not None
        ]
        return " and ".join(parts) or "no cap"

    def d_max(self, total: Callable[[float], float], active: Callable[[float], float], shape: Shape) -> float:
        """Largest d_model meeting every cap (inf without one): each count grows with d. `total` and
        `active` are the law family's non-embedding counts as functions of d."""
        bounds = [math.inf]
        if self.memory is not None:
            mem = lambda d: memory_bytes(d, total(d), self.kv_tokens, self.bytes_per_param, shape)  # noqa: E731
            bounds.append(_d_at(mem, self.memory))
        if self.max_total_params is not None:
            bounds.append(_d_at(total, self.max_total_params))
        if self.max_active_params is not None:
            bounds.append(_d_at(active, self.max_active_params))
        return min(bounds)


def eq9_total_cap(E: float, caps: Caps, aspect: float = acc.ASPECT, vocab: float = VOCAB) -> float | None:
    """The cap on Eq. 9's N (total non-embedding params, (8E + 4) n d^2) that `caps` amounts to at E:
    `memory` is converted with the same bytes model (embeddings of vocab `vocab`, KV cache), so the
    fine-grained planner's own convex search, clipped at a total-parameter cap, stays exact."""
    if caps.memory is None:
        return caps.max_total_params
    shape = Shape(vocab, aspect)
    tot = lambda d: acc.total_params(d, d / aspect, E)  # noqa: E731
    mem = lambda d: memory_bytes(d, tot(d), caps.kv_tokens, caps.bytes_per_param, shape)  # noqa: E731
    cap = float(tot(_d_at(mem, caps.memory)))
    return cap if caps.max_total_params is None else min(cap, caps.max_total_params)


# --- planning ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JointPlan:
    """The best (N_act, D) at one E: `total_params` counts embeddings as the paper does;
    `at_cap`: a cap binds (the compute-optimal model, `compute_optimal_active_params`, does not fit)."""

    flops: float
    expansion_rate: float
    d_model: float
    n_blocks: float
    active_params: float
    total_params: float
    total_params_nonembedding: float
    tokens: float
    loss: float
    memory_bytes: float
    at_cap: bool
    compute_optimal_active_params: float


class NoFit(ConfigError):
    """No model at this E meets the caps: a search skips that E, a single plan reports it."""


def compute_optimal(law: JointLaw, flops: float, E: float) -> tuple[float, float]:
    """(N_act, D) minimising the loss under 6 N_act D = F at a fixed E: Chinchilla's closed form with
    p = -μ, q = -ν (their Eq. 7, whose G is written with the signed exponents)."""
    _check_budget(flops)
    m, mu, n, nu = law.reduced(E)
    if not (mu < 0 and nu < 0):
        raise ConfigError(
            f"at E={E:g} the joint law's exponents are mu={mu:.4g}, nu={nu:.4g}: the loss does not fall with "
            "both model size and tokens, so there is no compute-optimal model"
        )
    p, q = -mu, -nu
    G = (p * m / (q * n)) ** (1 / (p + q))
    return G * (flops / 6) ** (q / (p + q)), (flops / 6) ** (p / (p + q)) / G


def optimum(law: JointLaw, flops: float, E: float, caps: Caps = Caps(), shape: Shape = Shape()) -> JointPlan:
    """The best model at E within the caps. Along 6 N_act D = F the loss is two opposite powers of
    N_act, convex in log N_act, so the capped optimum is the compute-optimal N_act clipped to what
    fits: beyond the compute-optimal size a bigger model is both larger and worse."""
    if not (math.isfinite(E) and E >= 1):
        raise ConfigError(f"expansion rate E must be a number >= 1, got {E!r}")
    if flops > MAX_BUDGET:
        raise ConfigError(f"FLOPs budget {flops:.3g} is beyond {MAX_BUDGET:.0e}; plan for a budget below it")
    n_free, _ = compute_optimal(law, flops, E)
    total = lambda d: nonembedding_total(d, E, shape)  # noqa: E731
    d_cap = caps.d_max(total, lambda d: nonembedding_active(d, shape), shape)
    if d_cap < MIN_D_MODEL:
        raise NoFit(f"no model with d_model >= {MIN_D_MODEL:g} fits {caps.text()} at E={E:g}")
    n_lo = float(active_params(MIN_D_MODEL, shape))
    if flops / (6 * n_lo) < 1:
        raise ConfigError(
            f"budget {flops:.3g} FLOPs cannot train one token of the smallest model ({6 * n_lo:.3g} FLOPs)"
        )
    n_cap = float(active_params(d_cap, shape)) if math.isfinite(d_cap) else math.inf
    N = min(max(n_free, n_lo), n_cap)
    d = d_cap if N == n_cap else d_model_for_active(N, shape)
    D = flops / (6 * N)
    tot = float(nonembedding_total(d, E, shape))
    return JointPlan(
        flops=flops,
        expansion_rate=E,
        d_model=d,
        n_blocks=d / shape.aspect,
        active_params=N,
        total_params=float(2 * d * shape.vocab + tot),
        total_params_nonembedding=tot,
        tokens=D,
        loss=float(law.loss(N, D, E)),
        memory_bytes=float(memory_bytes(d, tot, caps.kv_tokens, caps.bytes_per_param, shape)),
        at_cap=n_cap < n_free,
        compute_optimal_active_params=n_free,
    )


@dataclass(frozen=True)
class ERow:
    """One E of a search: its best plan, or why no model at this E fits (`reason`)."""

    expansion_rate: float
    plan: JointPlan | None
    reason: str = ""


def search_e(
    law: JointLaw,
    flops: float,
    rates: Sequence[float] = PAPER_RATES,
    caps: Caps = Caps(),
    shape: Shape = Shape(),
) -> tuple[JointPlan, list[ERow]]:
    """The best E among `rates` for a budget within the caps (their memory-optimal model), and every
    E's own best. Ties go to the smaller E: the same loss for fewer parameters."""
    if not rates:
        raise ConfigError("give at least one expansion rate to search")
    rows = []
    for E in sorted(set(rates)):
        try:
            rows.append(ERow(E, optimum(law, flops, E, caps, shape)))
        except NoFit as e:
            rows.append(ERow(E, None, str(e)))
    ok = [r.plan for r in rows if r.plan is not None]
    if not ok:
        raise ConfigError(f"no E in {sorted(set(rates))} fits {caps.text()}: {rows[0].reason}")
    best = min(ok, key=lambda p: (round(p.loss, 12), p.expansion_rate))
    return best, rows


def beyond_fit(plan: JointPlan, fitted: dict[str, Any]) -> list[str]:
    """Where a plan leaves the runs the law was fitted on (E, active and total size, tokens)."""

    def num(v) -> float | None:
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    out = []
    rates = [r for r in map(num, fitted.get("expansion_rates") or []) if r is not None]
    if rates and plan.expansion_rate > max(rates):
        out.append(f"E={plan.expansion_rate:g} is beyond the largest fitted E ({max(rates):g})")
    for key, v, what in (
        ("max_active_params", plan.active_params, "active params"),
        ("max_total_params", plan.total_params, "total params"),
        ("max_tokens", plan.tokens, "tokens"),
    ):
        top = num(fitted.get(key))
        if top and v > top:
            out.append(f"{v:.3g} {what} is {v / top:.1f}x the largest fitted ({top:.3g})")
    return out


# --- the paper's tables ----------------------------------------------------------------------------

# Table 1 as printed: (budget, E, N_act^opt, D^opt).
PAPER_TABLE1 = (
    (1e20, 1, 1.7e9, 9.7e9),
    (1e20, 2, 1.5e9, 11.4e9),
    (1e20, 4, 1.2e9, 13.9e9),
    (1e20, 8, 990e6, 17e9),
    (1e20, 16, 810e6, 20.7e9),
    (1e20, 32, 669e6, 24.9e9),
    (1e21, 1, 5.7e9, 29.3e9),
    (1e21, 2, 5e9, 33e9),
    (1e21, 4, 4.4e9, 38e9),
    (1e21, 8, 3.8e9, 44.3e9),
    (1e21, 16, 3.3e9, 51.2e9),
    (1e21, 32, 2.85e9, 58.4e9),
    (1e22, 1, 18.8e9, 88.6e9),
    (1e22, 2, 17.4e9, 96e9),
    (1e22, 4, 15.8e9, 105.4e9),
    (1e22, 8, 14.4e9, 115.8e9),
    (1e22, 16, 13.2e9, 126.5e9),
    (1e22, 32, 12.2e9, 136.9e9),
)

# Table 2 as printed: the optimal E per training budget (rows) and memory (columns: RTX 4090, H100,
# 8xH100 node), with 16k KV-cache tokens and bfloat16. (32, True) is their "≥ 32": the largest E searched.
TABLE2_MEMORY = (24e9, 80e9, 640e9)
TABLE2_KV_TOKENS = 16_384
PAPER_TABLE2 = (
    (1e21, ((16, False), (32, True), (32, True))),
    (1e22, ((4, False), (16, False), (32, True))),
    (1e23, ((1, False), (8, False), (32, True))),
    (1e24, ((1, False), (1, False), (16, False))),
)


def table1(law: JointLaw) -> list[dict[str, Any]]:
    """Their Table 1 recomputed (Eq. 7) beside the printed values."""
    rows = []
    for F, E, n_printed, d_printed in PAPER_TABLE1:
        N, D = compute_optimal(law, F, E)
        rows.append(
            {
                "flops": F,
                "expansion_rate": E,
                "active_params": N,
                "tokens": D,
                "printed": {"active_params": n_printed, "tokens": d_printed},
                "active_params_rel_err": N / n_printed - 1,
                "tokens_rel_err": D / d_printed - 1,
            }
        )
    return rows


def table2(
    law: JointLaw,
    memory: Sequence[float] = TABLE2_MEMORY,
    kv_tokens: float = TABLE2_KV_TOKENS,
    bytes_per_param: float = BF16,
    rates: Sequence[float] = PAPER_RATES,
) -> list[dict[str, Any]]:
    """Their Table 2 recomputed: the memory-optimal E per budget and memory, with every E's loss, and
    `margin`, how much worse the printed E is under this law (0 where they agree)."""
    out = []
    for F, cells in PAPER_TABLE2:
        for M, (printed, at_least) in zip(memory, cells):
            best, rows = search_e(
                law, F, rates, Caps(memory=M, kv_tokens=kv_tokens, bytes_per_param=bytes_per_param)
            )
            losses = {r.expansion_rate: (r.plan.loss if r.plan else math.inf) for r in rows}
            E = best.expansion_rate
            out.append(
                {
                    "flops": F,
                    "memory_bytes": M,
                    "expansion_rate": E,
                    "at_least": E == max(rates),
                    "printed": printed,
                    "printed_at_least": at_least,
                    "match": E == printed or (at_least and E >= printed),
                    "losses": {f"{k:g}": v for k, v in losses.items()},
                    "margin": losses.get(printed, math.inf) - best.loss,
                    "active_params": best.active_params,
                    "tokens": best.tokens,
                }
            )
    return out
