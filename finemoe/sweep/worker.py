"""Entry point of a local worker process: `python -m finemoe.sweep.worker STORE RUN_ID`."""

from __future__ import annotations

import argparse
import sys

from finemoe.sweep.runner import execute_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finemoe.sweep.worker")
    p.add_argument("store")
    p.add_argument("run_id")
    p.add_argument("--trainer", default="finemoe.sweep.runner:train_run")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    status = execute_run(a.store, a.run_id, a.trainer, a.threads)
    return 0 if status in ("done", "diverged", "skipped", "failed") else 1


if __name__ == "__main__":
    sys.exit(main())
