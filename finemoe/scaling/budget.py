"""One budget's plan as the CLI prints it and the Python API returns it: the compute-optimal MoE, a
buildable architecture, the dense and G=1 comparisons, and what the plan rests on. No torch."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from finemoe.scaling import plan as P
from finemoe.scaling.trust import coefficient_flags, plan_extrapolation, plan_uncertainty


def _plan_dict(p: P.Plan) -> dict[str, Any]:
    return {
        "granularity": p.granularity,
        "active_params": p.active_params,
        "total_params": p.total_params,
        "tokens": p.tokens,
        "loss": p.loss,
        "flops": p.flops,
        "d_model": p.d_model,
        "n_blocks": p.n_blocks,
        "at_cap": p.at_cap,
    }


def budget_plan(coeffs, flops: float, s: P.Settings) -> tuple[dict[str, Any], P.Architecture]:
    """The plan for `flops` under `coeffs` (the keys of `finemoe plan --json`), and its architecture."""
    cmp = P.compare(coeffs, flops, s)
    arch = P.architecture(coeffs.require("moe"), cmp.moe, s)
    dense = None
    if cmp.dense is not None:
        dense = {**_plan_dict(cmp.dense), "flops_multiple": cmp.dense_flops_multiple}
        dense.pop("granularity")
    flags = coefficient_flags(coeffs)
    out = {
        "coefficients": coeffs.name,
        "budget": flops,
        **_plan_dict(cmp.moe),
        "architecture": asdict(arch),
        "dense": dense,
        "g1": {**_plan_dict(cmp.g1), "flops_multiple": cmp.g1_flops_multiple},
        "settings": asdict(s),
        # what the plan rests on: the fit's flags, how far it extrapolates, its bootstrap band
        "flags": flags,
        "degenerate": any(flags.values()),
        "extrapolation": plan_extrapolation(coeffs, flops, cmp.moe.total_params, cmp.moe.tokens),
        "uncertainty": plan_uncertainty(coeffs, flops, s),
    }
    return out, arch
