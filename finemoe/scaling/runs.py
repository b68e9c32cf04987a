"""Load a run table (CSV, or the sweep's SQLite store with a `runs` table) into fit points.

Columns used: total_params (N), tokens (D), granularity (G), the loss column, and when present
`status` (only 'done' rows), `ffn` ('moe' | 'dense', selecting the rows a law applies to;
without it every row is used), `flops` (how far a plan extrapolates) and `run_id`/`parent` (a
stable run and its cooldown branches are one group to the bootstrap).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from finemoe.errors import DataError
from finemoe.scaling.fit import Points

LOSS_COLUMNS = ("train_loss", "val_loss")


def read_table(path: str | Path) -> list[dict]:
    """The rows of a results store or CSV, through the store's reader (finemoe.sweep.store.load_runs)."""
    from finemoe.sweep.store import load_runs

    return load_runs(path, require_status=False).to_dict("records")


def _column(path, rows: list[dict], col: str) -> np.ndarray:
    """A numeric column; an empty cell is NaN (a run with no loss), text is the user's mistake."""
    out = np.empty(len(rows))
    for i, r in enumerate(rows):
        v = r.get(col)
        if v is None or v == "":
            out[i] = math.nan
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise DataError(
                f"results {path}: column {col!r} holds {v!r}, not a number; fix or drop that row"
            ) from None
    return out


def load_points(path: str | Path | list, law: str = "moe", loss_column: str = "train_loss") -> Points:
    """Rows that a law applies to: finished runs of the right FFN kind. Dense rows get G = 1.

    Several tables (a list of paths) are read as one, each row keeping the columns its table has."""
    if isinstance(path, (list, tuple)):
        rows = [r for p in path for r in read_table(p)]
        path = ", ".join(str(p) for p in path)
    else:
        rows = read_table(path)
    return points_from_rows(rows, law, loss_column, path)


def points_from_rows(rows: list[dict], law: str, loss_column: str, path) -> Points:
    """`load_points` on rows already read (a DataFrame's records); `path` names them in errors."""
    if not rows:
        raise DataError(f"results {path}: the table has no rows")
    cols = set().union(*rows)
    need = ["total_params", "tokens", loss_column] + (["granularity"] if law != "dense" else [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise DataError(f"results {path}: missing column(s) {missing}; have {sorted(cols)}")
    if "status" in cols:
        rows = [r for r in rows if str(r.get("status")).strip().lower() == "done"]
    rows = _unique_runs(path, rows, loss_column)
    if "ffn" in cols:
        want = "dense" if law == "dense" else "moe"
        rows = [r for r in rows if str(r["ffn"]).strip().lower() == want]
    if not rows:
        raise DataError(
            f"results {path}: no finished ('done') {'dense' if law == 'dense' else 'moe'} runs to fit the "
            f"{law} law"
        )
    G = _column(path, rows, "granularity") if law != "dense" else np.ones(len(rows))
    flops = _column(path, rows, "flops") if "flops" in cols else None
    budget = _column(path, rows, "budget") if "budget" in cols else None
    return Points(
        _column(path, rows, "total_params"),
        _column(path, rows, "tokens"),
        G,
        _column(path, rows, loss_column),
        flops,
        run_groups(rows),
        budget,
    )


def _unique_runs(path, rows: list[dict], loss_column: str) -> list[dict]:
    """One row per run id: an exact repeat (the same table given twice) is dropped, a run id with two
    different results is the user's to resolve."""
    seen: dict[str, dict] = {}
    out = []
    for r in rows:
        rid = r.get("run_id")
        if rid in (None, ""):
            out.append(r)
            continue
        key = tuple(_as_number(r.get(k)) for k in (loss_column, "tokens", "total_params", "granularity"))
        if rid in seen:
            if seen[rid] != key:
                raise DataError(
                    f"results {path}: run {rid} appears twice with different results "
                    f"({loss_column} {seen[rid][0]} and {key[0]}); keep one of them"
                )
            continue
        seen[rid] = key
        out.append(r)
    return out


def _as_number(v):
    """For comparing two rows' results: numbers as floats, a missing one (NaN, empty) as None."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(v) else v


def run_groups(rows: list[dict]) -> np.ndarray:
    """A label per row: its parent's id for a cooldown branch, its own id otherwise (the row number
    when the table has no ids)."""
    labels = []
    for i, r in enumerate(rows):
        parent = r.get("parent")
        own = r.get("run_id")
        labels.append(
            str(parent) if parent not in (None, "") and parent == parent else str(own if own else i)
        )
    return np.array(labels)
