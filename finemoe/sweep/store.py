"""Results store: one SQLite row per run, keyed by the hash of its config.

WAL mode lets `sweep status` read while workers write; every state change is one short transaction,
so a sweep killed at any instant leaves each row either before or after a change, never half of it.
A run is claimed with BEGIN IMMEDIATE (one writer at a time), so two workers never train the same run.
The flat columns are what `finemoe fit` reads; `config` and `record` keep everything else as JSON.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
import sqlite3
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from finemoe.errors import DataError
from finemoe.io import ensure_dir, finite_or_none

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINAL = ("done", "diverged")  # a re-run skips these; failed runs are retried

# Flat columns copied from the trainer's final record (the fit reads these).
RECORD_COLUMNS = {
    "ffn": "TEXT",
    "granularity": "INTEGER",
    "expansion_rate": "INTEGER",
    "d_model": "INTEGER",
    "n_blocks": "INTEGER",
    "total_params": "INTEGER",
    "active_params": "INTEGER",
    "tokens": "INTEGER",
    "flops": "REAL",
    "train_loss": "REAL",
    "val_loss": "REAL",
    "steps": "INTEGER",
    "tokens_per_s": "REAL",
    "wall_time_s": "REAL",
    "device": "TEXT",
    "schedule": "TEXT",
    "val_loss_independent": "REAL",
    "branched_at": "INTEGER",
}
COLUMNS = {
    "run_id": "TEXT PRIMARY KEY",
    "sweep": "TEXT",
    "label": "TEXT",
    "status": "TEXT NOT NULL",
    **RECORD_COLUMNS,
    "seed": "INTEGER",
    "budget": "REAL",
    "parent": "TEXT",
    "error": "TEXT",
    "code_version": "TEXT",
    "owner": "TEXT",
    "heartbeat_at": "TEXT",
    "started_at": "TEXT",
    "finished_at": "TEXT",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "config": "TEXT NOT NULL",
    "record": "TEXT",
}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe` of the checkout the code runs from, else the package version."""
    import finemoe

    root = Path(finemoe.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return getattr(finemoe, "__version__", "unknown")


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_alive(owner: str | None, heartbeat_at: str | None, stale_s: float = 300.0) -> bool:
    """Is the process that claimed a run still there? Same host: ask the kernel; else trust the heartbeat."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _zombie(int(pid)) is False
    if not heartbeat_at:
        return False
    age = (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(heartbeat_at)).total_seconds()
    return age < stale_s


def _zombie(pid: int) -> bool:
    # A killed child we have not reaped yet still answers kill(pid, 0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Store:
    """A SQLite results store; connections are short-lived so it is safe across fork/spawn and hosts."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        """create=True: make or migrate the store (a sweep writes it). create=False: open an existing
        store read-only, refusing a file that is not one (status and export never change it)."""
        self.path = Path(path)
        self.readonly = not create
        if self.readonly:
            if not self.path.is_file():
                raise DataError(
                    f"results store {self.path} not found; run `finemoe sweep run SPEC` first or pass --store"
                )
            with self._connect() as con:
                have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            missing = {"run_id", "status", "config"} - have
            if missing:
                raise DataError(
                    f"{self.path} is not a finemoe results store (no 'runs' table with "
                    f"{', '.join(sorted(missing))}); give the store a sweep wrote"
                )
            return
        ensure_dir(self.path.parent, "results store folder")
        if self.path.is_file() and self.path.stat().st_size and not _is_sqlite(self.path):
            raise DataError(f"{self.path} is not a SQLite file; give a new path or a finemoe results store")
        with self._connect() as con:
            have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if (tables and not have) or (have and not {"run_id", "status", "config"} <= have):
                raise DataError(
                    f"{self.path} is a SQLite file of something else; give a new path or a finemoe store"
                )
            con.execute("PRAGMA journal_mode=WAL")
            cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
            con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
            for k, v in COLUMNS.items():  # stores written by an older version gain the new columns
                if k not in have:
                    con.execute(
                        f"ALTER TABLE runs ADD COLUMN {k} "
                        f"{v.replace('PRIMARY KEY', '').replace('NOT NULL', '')}"
                    )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            if self.readonly:
                con = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, timeout=60.0, isolation_level=None
                )
            else:
                con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        except sqlite3.Error as e:
            raise DataError(f"cannot open results store {self.path}: {e}") from None
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA busy_timeout=60000")
            if not self.readonly:
                con.execute("PRAGMA synchronous=FULL")
            yield con
        except sqlite3.DatabaseError as e:
            text = str(e)
            if "not a database" in text or "malformed" in text:
                raise DataError(f"{self.path} is not a readable SQLite results store ({e})") from None
            if "disk is full" in text or "disk I/O" in text or "readonly" in text:
                raise DataError(
                    f"cannot write results store {self.path} ({e}); its last committed state is kept"
                ) from None
            raise
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: the whole block is applied or none of it."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- writes -------------------------------------------------------------------------------------

    def add(self, runs: Iterable[Any], sweep: str) -> int:
        """Insert runs as pending unless already present; returns how many were new."""
        with self.transaction() as con:
            before = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            con.executemany(
                "INSERT OR IGNORE INTO runs (run_id, sweep, label, status, seed, budget, parent, config, ffn,"
                " granularity, expansion_rate, d_model, n_blocks, tokens) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        r.run_id,
                        sweep,
                        r.label,
                        "pending",
                        r.config.get("seed"),
                        getattr(r, "budget", None),
                        getattr(r, "parent", None),
                        json.dumps(r.config, sort_keys=True),
                        r.config["model"]["ffn"],
                        _g(r.config["model"]),
                        _e(r.config["model"]),
                        r.config["model"]["d_model"],
                        r.config["model"]["n_blocks"],
                        r.config["tokens"],
                    )
                    for r in runs
                ],
            )
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] - before

    def claim(self, run_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """Mark a run 'running' for `owner` if nobody live holds it and it is not final; else None."""
        owner = owner or owner_id()
        with self.transaction() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None or row["status"] in FINAL:
                return None
            if (
                row["status"] == "running"
                and row["owner"] != owner
                and owner_alive(row["owner"], row["heartbeat_at"])
            ):
                return None
            t = now()
            con.execute(
                "UPDATE runs SET status='running', owner=?, heartbeat_at=?, started_at=COALESCE(started_at, "
                "?),"
                " attempts=attempts+1, error=NULL, code_version=? WHERE run_id=?",
                (owner, t, t, code_version(), run_id),
            )
            return dict(row) | {"status": "running", "owner": owner}

    def heartbeat(self, run_id: str, owner: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET heartbeat_at=? WHERE run_id=? AND owner=?", (now(), run_id, owner))

    def finish(self, run_id: str, record: dict[str, Any]) -> None:
        """Store the trainer's final record; its status ('done' or 'diverged') becomes the row's."""
        status = record.get("status", "done")
        if status not in FINAL:
            raise DataError(f"run {run_id}: trainer returned status {status!r}, expected one of {FINAL}")
        flat = {k: finite_or_none(record.get(k)) for k in RECORD_COLUMNS}
        error = record.get("error")
        if status == "diverged" and not error:
            error = f"diverged: non-finite loss or gradient after {record.get('steps')} steps"
        sets = ", ".join(f"{k}=COALESCE(?, {k})" for k in flat)
        with self.transaction() as con:
            con.execute(
                f"UPDATE runs SET {sets}, status=?, error=?, finished_at=?, record=? WHERE run_id=?",
                (
                    *flat.values(),
                    status,
                    error,
                    now(),
                    json.dumps(record, sort_keys=True, default=str),
                    run_id,
                ),
            )

    def import_finished(self, path: str | os.PathLike, run_ids: Iterable[str]) -> tuple[int, list[str]]:
        """Copy finished rows of an exported CSV into this store, for runs it has not finished; returns
        how many, and why each finished row that was not taken was refused (it will train again).

        A sweep's CSV is committed while its store and checkpoints are not, so a fresh checkout picks
        up where an earlier session stopped instead of training those runs again.
        """
        df = load_runs(path)
        keep = set(run_ids)
        cols = [c for c in COLUMNS if c != "run_id" and c in df.columns]
        rows, refused = [], []
        for r in df.to_dict("records"):
            if r.get("run_id") not in keep or r.get("status") not in FINAL:
                continue
            why = _invalid_finished(r)
            if why:
                refused.append(f"{r['run_id']}: {why}")
            else:
                rows.append(r)
        with self.transaction() as con:
            final = {r[0] for r in con.execute(f"SELECT run_id FROM runs WHERE status IN {FINAL}")}
            new = [r for r in rows if r["run_id"] not in final]
            con.executemany(
                f"UPDATE runs SET {', '.join(f'{c}=?' for c in cols)} WHERE run_id=?",
                [(*(_from_csv(r[c]) for c in cols), r["run_id"]) for r in new],
            )
        return len(new), refused

    def fail(self, run_id: str, error: str) -> None:
        with self.transaction() as con:
            con.execute(
                "UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                (error, now(), run_id),
            )

    def release_dead(self) -> int:
        """Rows 'running' under a dead owner go back to 'pending' (they resume from their checkpoint)."""
        with self.transaction() as con:
            rows = con.execute(
                "SELECT run_id, owner, heartbeat_at FROM runs WHERE status='running'"
            ).fetchall()
            dead = [r["run_id"] for r in rows if not owner_alive(r["owner"], r["heartbeat_at"])]
            con.executemany(
                "UPDATE runs SET status='pending', owner=NULL WHERE run_id=?", [(d,) for d in dead]
            )
            return len(dead)

    # -- reads --------------------------------------------------------------------------------------

    def get(self, run_id: str) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def rows(self, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY rowid")]
        if run_ids is not None:
            keep = set(run_ids)
            rows = [r for r in rows if r["run_id"] in keep]
        return rows

    def counts(self, run_ids: Iterable[str] | None = None) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for r in self.rows(run_ids):
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def dataframe(self):
        return load_runs(self.path)

    def export_csv(self, path: str | os.PathLike, runs: Sequence[str] | None = None) -> Path:
        """Write the runs table to CSV atomically (the config and record JSON included). With `runs`
        (a spec's run ids), unfinished rows of runs the spec no longer lists are left out: a grid cut
        short keeps its finished runs, not the ones it dropped."""
        from finemoe.io import atomic_path

        df = self.dataframe().drop(columns=["owner", "heartbeat_at"], errors="ignore")
        if runs is not None:
            df = df[df.run_id.isin(list(runs)) | df.status.isin(FINAL)]
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
        return Path(path)


def _invalid_finished(row: dict[str, Any]) -> str | None:
    """Why a CSV row marked finished cannot stand for a finished run, or None."""

    def number(k):
        try:
            v = float(row.get(k))
        except (TypeError, ValueError):
            return math.nan
        return v

    if row.get("status") == "done":
        if not (math.isfinite(number("train_loss")) and number("train_loss") > 0):
            return f"status done but train_loss is {row.get('train_loss')!r}"
        for k in ("tokens", "total_params", "flops"):
            if k in row and not (math.isfinite(number(k)) and number(k) > 0):
                return f"status done but {k} is {row.get(k)!r}"
    return None


def _from_csv(x: Any) -> Any:
    """pandas reads empty cells as NaN and integers as numpy scalars; SQLite wants None and Python."""
    if isinstance(x, float) and math.isnan(x):
        return None
    return x.item() if hasattr(x, "item") else x


def _g(m: dict[str, Any]) -> int:
    return int(m.get("granularity", 1)) if m["ffn"] == "moe" else 0


def _e(m: dict[str, Any]) -> int:
    return int(m.get("expansion_rate", 1)) if m["ffn"] == "moe" else 1


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def load_runs(path: str | os.PathLike, require_status: bool = True):
    """The runs of a store (.sqlite/.db) or of an exported CSV as a pandas DataFrame: the one reader
    behind fit, report and export. A hand-made CSV for `fit` may leave out `status` (require_status=False)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"results file {p} not found; give a results store (.sqlite) or a CSV exported from one"
        )
    if _is_sqlite(p):
        try:
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=60.0)
            try:
                return pd.read_sql_query("SELECT * FROM runs ORDER BY rowid", con)
            finally:
                con.close()
        except (sqlite3.Error, pd.errors.DatabaseError) as e:
            raise DataError(
                f"{p} has no readable 'runs' table ({e}); is it a finemoe results store?"
            ) from None
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(
            f"{p} is neither a SQLite store nor a readable CSV ({e.__class__.__name__})"
        ) from None
    if require_status and "status" not in df.columns:
        raise DataError(f"{p} has no 'status' column; export it with `finemoe sweep export` or add one")
    return df
