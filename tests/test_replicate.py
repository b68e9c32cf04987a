"""Smoke test of `make replicate`: the committed mini-replication spec and results load, the sweep
would train only the runs the CSV lacks, and the report builds from the committed results."""

import csv
import json
from pathlib import Path

from finemoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "experiments" / "mini"


def _done_rows() -> list[dict]:
    with open(MINI / "results.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "done"]


def test_replicate_resumes_from_the_committed_csv(tmp_path, capsys):
    done = _done_rows()
    assert (
        main(
            [
                "sweep",
                "run",
                str(MINI / "spec.yaml"),
                "--dry-run",
                "--store",
                str(tmp_path / "s.sqlite"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["done"] == len(done) and out["done"] + out["to_run"] == 30
    assert out["failed"] == 0


def test_replicate_report_builds_from_the_committed_results(tmp_path, capsys):
    done = _done_rows()
    (tmp_path / "d.md").write_text("What the runs show, in the author's words.\n")
    code = main(
        [
            "report",
            str(MINI / "results.csv"),
            "--out",
            str(tmp_path),
            "--bootstrap",
            "0",
            "--json",
            "--discussion",
            str(tmp_path / "d.md"),
        ]
    )
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    text = (tmp_path / "report.md").read_text()
    assert f"{len(done)} done" in text
    assert text.rstrip().endswith("## Discussion\n\nWhat the runs show, in the author's words.")
    for row in done[:3]:
        assert row["run_id"] in text
    assert Path(info["report"]).name == "report.md"
    assert info["figures"] and all(Path(f).stat().st_size > 10_000 for f in info["figures"])
