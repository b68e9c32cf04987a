"""Choosing E under Eq. 9, which is fitted at one E: one coefficient set per E, each planned under the
same memory cap, and the E whose set predicts the lowest loss wins. No torch.

The memory cap becomes a cap on total parameters per E (more experts, fewer of everything else), so the
search trades expert count against model size the way a device forces it to.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from finemoe.errors import ConfigError
from finemoe.scaling import joint as J
from finemoe.scaling import plan as P
from finemoe.scaling.laws import CoefficientSet, load_coefficients

PUBLISHED = {64: "paper", 16: "paper-e16"}  # the paper's Eq. 9 sets, at E=64 and E=16


def capped(s: P.Settings, caps: J.Caps) -> P.Settings:
    """`s` with the memory cap, if any, turned into its E's cap on total parameters."""
    if caps.memory is None:
        return s
    return replace(s, max_total_params=J.eq9_total_cap(s.expansion_rate, caps, s.aspect))


def search(
    own: CoefficientSet,
    s: P.Settings,
    budget: float,
    caps: J.Caps,
    rates: Sequence[float] | None = None,
    published: Mapping[float, str] = PUBLISHED,
) -> tuple[CoefficientSet, P.Settings, list[dict[str, Any]]]:
    """Plan `budget` at each E in `rates` (default: every E with a set) with that E's coefficients (`own`
    at its own E, else a published set); returns the best E's set and Settings, and one row per E."""
    sets: dict[float, CoefficientSet | str] = {**published, own.expansion_rate: own}
    rates = tuple(rates or sorted(published))
    missing = [E for E in rates if E not in sets]
    if missing:
        raise ConfigError(
            f"--law eq9 has a coefficient set only at E in {sorted(sets)} (paper-e16 at 16, paper at 64, "
            f"--coefficients at its own E), not at {missing}; search other E with --law joint"
        )
    cands = []
    for E in rates:
        c = sets[E] if isinstance(sets[E], CoefficientSet) else load_coefficients(sets[E])
        cands.append((c, capped(replace(s, expansion_rate=E), caps)))
    best, results = P.optimum_over_e(cands, budget)
    return cands[best][0], cands[best][1], [_row(c, sE, r, caps) for (c, sE), r in zip(cands, results)]


def _row(c: CoefficientSet, s: P.Settings, r: P.Plan | str, caps: J.Caps) -> dict[str, Any]:
    row: dict[str, Any] = {"expansion_rate": s.expansion_rate, "coefficients": c.name}
    row["feasible"] = isinstance(r, P.Plan)
    if not isinstance(r, P.Plan):
        return row | {"reason": r}
    mem = J.memory_bytes(
        r.d_model, r.total_params, caps.kv_tokens, caps.bytes_per_param, J.Shape(J.VOCAB, s.aspect)
    )
    return row | {
        "granularity": r.granularity,
        "active_params": r.active_params,
        "total_params": r.total_params,
        "tokens": r.tokens,
        "loss": r.loss,
        "at_cap": r.at_cap,
        "memory_bytes": mem,
    }
