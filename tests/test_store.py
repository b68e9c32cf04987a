"""Results store: transactions, claims, dead owners, the columns `finemoe fit` reads, CSV round trip."""

import json
import math
import sqlite3
import subprocess
import sys

import pytest

from finemoe.errors import DataError
from finemoe.sweep import spec as specmod
from finemoe.sweep.store import Store, load_runs, owner_alive, owner_id

FIT_COLUMNS = [
    "status",
    "ffn",
    "granularity",
    "expansion_rate",
    "total_params",
    "active_params",
    "tokens",
    "flops",
    "train_loss",
    "val_loss",
]


def _spec(tmp_path):
    return specmod.expand(
        {
            "name": "t",
            "data_dir": str(tmp_path / "data"),
            "runs_dir": str(tmp_path / "runs"),
            "model": {"vocab_size": 64, "seq_len": 8, "expansion_rate": 4},
            "sizes": [{"d_model": 64, "n_blocks": 1}],
            "granularities": [1, 2],
            "tokens": [1000],
            "dense": True,
        }
    )


def _record(status="done", loss=3.0):
    return {
        "status": status,
        "ffn": "moe",
        "granularity": 2,
        "expansion_rate": 4,
        "d_model": 64,
        "n_blocks": 1,
        "total_params": 100,
        "active_params": 50,
        "tokens": 1000,
        "flops": 1e9,
        "train_loss": loss,
        "val_loss": loss + 0.1,
        "steps": 10,
        "tokens_per_s": 5.0,
        "wall_time_s": 2.0,
        "device": "cpu",
    }


def test_add_is_idempotent_and_rows_have_fit_columns(tmp_path):
    sp = _spec(tmp_path)
    st = Store(tmp_path / "s.sqlite")
    assert st.add(sp.runs, "t") == 3
    assert st.add(sp.runs, "t") == 0
    assert st.counts()["pending"] == 3
    with sqlite3.connect(st.path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    assert set(FIT_COLUMNS) <= cols
    assert {
        "run_id",
        "config",
        "error",
        "device",
        "wall_time_s",
        "code_version",
        "started_at",
        "finished_at",
    } <= cols
    row = st.get(sp.runs[0].run_id)
    assert json.loads(row["config"]) == sp.runs[0].config


def test_claim_is_exclusive_and_dead_owners_release(tmp_path):
    sp = _spec(tmp_path)
    st = Store(tmp_path / "s.sqlite")
    st.add(sp.runs, "t")
    rid = sp.runs[0].run_id
    assert st.claim(rid, owner_id())["status"] == "running"  # this process: alive
    assert st.claim(rid, "otherhost:1") is None  # a second claimer is refused while the owner lives
    assert st.get(rid)["code_version"]
    # a process that has exited is a dead owner: its run can be claimed again (and resumes)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = owner_id().rpartition(":")[0]
    st2 = Store(st.path)
    with st2.transaction() as con:
        con.execute("UPDATE runs SET owner=? WHERE run_id=?", (f"{host}:{dead.stdout.strip()}", rid))
    assert st.release_dead() == 1
    assert st.get(rid)["status"] == "pending"
    assert st.claim(rid, "otherhost:1")["owner"] == "otherhost:1"
    assert st.get(rid)["attempts"] == 2


def test_owner_on_other_host_is_judged_by_heartbeat():
    from finemoe.sweep.store import now

    assert owner_alive("elsewhere:123", now())
    assert not owner_alive("elsewhere:123", "2000-01-01T00:00:00+00:00")
    assert not owner_alive(None, None)


def test_finish_fail_and_transaction_rollback(tmp_path):
    sp = _spec(tmp_path)
    st = Store(tmp_path / "s.sqlite")
    st.add(sp.runs, "t")
    a, b, c = (r.run_id for r in sp.runs)
    st.finish(a, _record())
    st.finish(b, _record("diverged", math.nan))
    st.fail(c, "RuntimeError: boom")
    ra, rb, rc = st.get(a), st.get(b), st.get(c)
    assert ra["status"] == "done" and ra["train_loss"] == 3.0 and ra["finished_at"]
    assert json.loads(ra["record"])["steps"] == 10
    assert rb["status"] == "diverged" and rb["train_loss"] is None and "diverged" in rb["error"]
    assert rc["status"] == "failed" and rc["error"] == "RuntimeError: boom"
    with pytest.raises(DataError, match="status 'weird'"):
        st.finish(a, _record("weird"))
    # an exception inside a transaction leaves nothing behind
    with pytest.raises(RuntimeError):
        with st.transaction() as con:
            con.execute("UPDATE runs SET train_loss=99 WHERE run_id=?", (a,))
            raise RuntimeError("crash mid-transaction")
    assert st.get(a)["train_loss"] == 3.0
    assert st.claim(a) is None  # done is final


def test_csv_round_trip_and_dataframe(tmp_path):
    sp = _spec(tmp_path)
    st = Store(tmp_path / "s.sqlite")
    st.add(sp.runs, "t")
    st.finish(sp.runs[0].run_id, _record())
    csv = st.export_csv(tmp_path / "out" / "runs.csv")
    df_csv, df_db = load_runs(csv), load_runs(st.path)
    assert len(df_csv) == len(df_db) == 3
    assert set(FIT_COLUMNS) <= set(df_csv.columns)
    done = df_csv[df_csv.status == "done"]
    assert done.train_loss.tolist() == [3.0] and done.granularity.tolist() == [2]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_a_cut_spec_exports_its_runs_and_every_finished_one(tmp_path):
    sp = _spec(tmp_path)
    st = Store(tmp_path / "s.sqlite")
    st.add(sp.runs, "t")
    dropped_done, dropped_pending, *kept = (r.run_id for r in sp.runs)
    st.finish(dropped_done, _record())
    csv = st.export_csv(tmp_path / "runs.csv", kept)
    assert set(load_runs(csv).run_id) == {dropped_done, *kept}  # the dropped, unfinished run is gone


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_runs(tmp_path / "missing.sqlite")
    with pytest.raises(DataError, match="not found"):
        Store(tmp_path / "missing.sqlite", create=False)
    junk = tmp_path / "junk.csv"
    junk.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'status' column"):
        load_runs(junk)
    empty_db = tmp_path / "other.sqlite"
    sqlite3.connect(empty_db).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(DataError, match="runs"):
        load_runs(empty_db)
