"""The paper's loss laws and its published coefficient sets (§4). Pure numpy, vectorised over inputs.

  Eq. 9 (MoE):          L(N, D, G) = c + (g / G^gamma + a) N^-alpha + b D^-beta
  Eq. 1 (dense):        L(N, D)    = c + a N^-alpha + b D^-beta
  Eq. 4 (per (N, D)):   L(G)       = g / G^gamma + h

N counts total non-embedding parameters (router excluded), D training tokens, G granularity.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from finemoe.errors import ConfigError


@dataclass(frozen=True)
class MoELaw:
    a: float
    alpha: float
    b: float
    beta: float
    g: float
    gamma: float
    c: float

    def loss(self, N, D, G):
        N, D, G = np.asarray(N, float), np.asarray(D, float), np.asarray(G, float)
        with np.errstate(over="ignore"):  # a law fitted on tiny runs may blow up far away: inf, not a warning
            return self.c + (self.g * G**-self.gamma + self.a) * N**-self.alpha + self.b * D**-self.beta


@dataclass(frozen=True)
class DenseLaw:
    a: float
    alpha: float
    b: float
    beta: float
    c: float

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        with np.errstate(over="ignore"):
            return self.c + self.a * N**-self.alpha + self.b * D**-self.beta


@dataclass(frozen=True)
class GranularityLaw:
    g: float
    gamma: float
    h: float

    def loss(self, G):
        return self.g * np.asarray(G, float) ** -self.gamma + self.h


@dataclass(frozen=True)
class CoefficientSet:
    """A named pair of laws; `dense` is optional (a user fit may hold only one law)."""

    name: str
    moe: MoELaw | None
    dense: DenseLaw | None = None
    expansion_rate: int = 64
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def require(self, law: str):
        got = getattr(self, law)
        if got is None:
            raise ConfigError(
                f"coefficients {self.name!r} have no {law} law; fit one with "
                f"`finemoe fit RESULTS --law {law} --out FILE.json` or use --coefficients paper"
            )
        return got

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "expansion_rate": self.expansion_rate,
        }
        if self.moe is not None:
            out["moe"] = asdict(self.moe)
        if self.dense is not None:
            out["dense"] = asdict(self.dense)
        out.update(self.extra)
        return out


PUBLISHED = ("paper", "paper-precise", "paper-holdout", "paper-e16")


def law_from_dict(cls, data: Any, where: str, signed: bool = False):
    """A law dataclass from a JSON object: every coefficient present and a finite number, and
    non-negative unless the law's form has signed exponents (`signed`)."""
    names = [f.name for f in fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object with keys {names}")
    missing = [k for k in names if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing coefficient(s) {missing}; a law needs {names}")
    vals = {}
    for k in names:
        try:
            v = float(data[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: coefficient {k}={data[k]!r} is not a number") from None
        if not math.isfinite(v) or (v < 0 and not signed):
            raise ConfigError(
                f"{where}: coefficient {k}={v} must be finite" + ("" if signed else " and non-negative")
            )
        vals[k] = v
    return cls(**vals)


def coefficients_from_dict(data: Any, where: str = "coefficients") -> CoefficientSet:
    if not isinstance(data, dict) or not ("moe" in data or "dense" in data):
        raise ConfigError(
            f"{where}: expected a JSON object with a 'moe' and/or 'dense' law (as `finemoe fit --out` writes)"
        )
    known = {"name", "source", "expansion_rate", "moe", "dense"}
    return CoefficientSet(
        name=str(data.get("name", where)),
        moe=law_from_dict(MoELaw, data["moe"], f"{where}: moe") if data.get("moe") is not None else None,
        dense=law_from_dict(DenseLaw, data["dense"], f"{where}: dense")
        if data.get("dense") is not None
        else None,
        expansion_rate=int(data.get("expansion_rate", 64)),
        source=str(data.get("source", "")),
        extra={k: v for k, v in data.items() if k not in known},
    )


def prior_exponents(name: str, law: str) -> dict[str, float]:
    """The exponents a published set gives `law` (`fit --prior`): what small runs cannot identify."""
    published = getattr(load_coefficients(name), law)
    return {k: getattr(published, k) for k in ("gamma", "alpha", "beta") if hasattr(published, k)}


def read_coefficients_json(
    spec: str, published: tuple[str, ...], what: str, fix: str = ""
) -> tuple[Any, str]:
    """(the JSON, its source name) of a set shipped in finemoe/scaling/coefficients/ by name, or of a
    JSON file path; `what` names the kind in errors, `fix` ends the unreadable-file one."""
    if spec in published:
        text = resources.files("finemoe.scaling").joinpath("coefficients", f"{spec}.json").read_text()
        return json.loads(text), spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{what} {spec!r}: not a published set {list(published)} nor an existing JSON file")
    try:
        return json.loads(path.read_text()), str(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} file {spec}: cannot read JSON ({e}){fix}") from None


def load_coefficients(spec: str) -> CoefficientSet:
    """A published set by name (`paper`, `paper-precise`, ...) or a JSON file path."""
    data, source = read_coefficients_json(
        spec, PUBLISHED, "coefficients", "; write it with `finemoe fit --out`"
    )
    return coefficients_from_dict(data, source)
