"""`finemoe sweep run|status|export`: run a grid of training runs into a results store and inspect it."""

from __future__ import annotations

import argparse

from finemoe.commands.common import add_json_flag, emit, positive_int


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a sweep of training runs into a results store; show its status")
    ss = p.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")

    r = ss.add_parser("run", help="run every run of SPEC not already finished (safe to re-run)")
    r.add_argument("spec", help="sweep spec YAML, or a built-in name such as 'quickstart'")
    r.add_argument(
        "--executor",
        choices=("local", "inprocess", "slurm", "submitit-local"),
        help="where runs execute (default: the spec's, else local worker processes)",
    )
    r.add_argument("--workers", type=positive_int, help="local worker processes (default 1)")
    r.add_argument("--threads", type=positive_int, help="torch threads per run (default: cores / workers)")
    r.add_argument("--store", help="results store (default: the spec's)")
    r.add_argument("--dry-run", action="store_true", help="register the runs and say what would run")
    add_json_flag(r)
    r.set_defaults(func=run)

    s = ss.add_parser("status", help="done / running / failed / pending runs with tokens and losses")
    s.add_argument("spec", nargs="?", help="sweep spec (its runs, in order); omit to list the whole --store")
    s.add_argument("--store", help="results store (default: the spec's)")
    add_json_flag(s)
    s.set_defaults(func=status)

    e = ss.add_parser("export", help="write the store's runs table to CSV")
    e.add_argument("spec", nargs="?", help="sweep spec whose store to export")
    e.add_argument("--store", help="results store (default: the spec's)")
    e.add_argument("--csv", required=True, help="output CSV path")
    add_json_flag(e)
    e.set_defaults(func=export)


def _spec_and_store(args: argparse.Namespace, must_exist: bool):
    from finemoe.errors import ConfigError
    from finemoe.sweep import spec as specmod
    from finemoe.sweep.store import Store

    spec = specmod.load(args.spec) if args.spec else None
    if spec is not None and args.store:
        spec.store = args.store
    path = args.store or (spec.store if spec else None)
    if path is None:
        raise ConfigError("give a sweep SPEC or --store PATH")
    return spec, Store(path, create=not must_exist)


def run(args: argparse.Namespace) -> int:
    from finemoe.sweep import spec as specmod
    from finemoe.sweep.driver import run_sweep

    spec = specmod.load(args.spec)
    if args.store:
        spec.store = args.store
    quiet = args.json
    out = run_sweep(
        spec,
        executor=args.executor,
        options={"workers": args.workers, "threads": args.threads},
        dry_run=args.dry_run,
        log=(lambda *_: None) if quiet else print,
    )
    emit(
        args,
        out,
        lambda o: (
            f"{o['done']} done, {o['diverged']} diverged, {o['failed']} failed, "
            f"{o['to_run']} not finished; store {o['store']}"
        ),
    )
    return 0 if out["failed"] == 0 or args.dry_run else 1


def status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finemoe.sweep import spec as specmod
    from finemoe.sweep.driver import status_rows
    from finemoe.sweep.store import Store

    spec = specmod.load(args.spec) if args.spec else None
    path = args.store or (spec.store if spec else None)
    if path is None:
        from finemoe.errors import ConfigError

        raise ConfigError("give a sweep SPEC or --store PATH")
    if spec is not None:
        spec.store = path
        store = Store(path, create=False) if Path(path).is_file() else None
        rows = status_rows(store, spec) if store else status_rows_unstarted(spec)
    else:
        rows = status_rows(Store(path, create=False))
    keys = ("run_id", "label", "status", "tokens", "train_loss", "val_loss", "wall_time_s", "device", "error")
    rows = [{k: r.get(k) for k in keys} for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"].split()[0]] = counts.get(r["status"].split()[0], 0) + 1
    emit(args, {"store": str(path), "counts": counts, "runs": rows}, _human)
    return 0


def status_rows_unstarted(spec) -> list[dict]:
    return [
        {"run_id": r.run_id, "label": r.label, "status": "pending", "tokens": r.config["tokens"]}
        for r in spec.runs
    ]


def _human(o: dict) -> str:
    def f(x, fmt):
        return "" if x is None or x != x else format(x, fmt)

    lines = [
        f"{'run':<16} {'label':<30} {'status':<10} {'tokens':>9} {'train':>7} {'val':>7} {'wall s':>7}  error"
    ]
    for r in o["runs"]:
        err = (r.get("error") or "").strip().splitlines()
        lines.append(
            f"{r['run_id']:<16} {str(r.get('label') or ''):<30} {r['status']:<10} "
            f"{f(r['tokens'], '9.3g'):>9} "
            f"{f(r['train_loss'], '.4f'):>7} {f(r['val_loss'], '.4f'):>7} {f(r['wall_time_s'], '.0f'):>7}  "
            f"{err[-1][:60] if err else ''}"
        )
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(o["counts"].items())) + f"  (store {o['store']})")
    return "\n".join(lines)


def export(args: argparse.Namespace) -> int:
    from finemoe.commands.common import check_outputs

    check_outputs(args.csv)
    spec, store = _spec_and_store(args, must_exist=True)
    from finemoe.sweep.store import load_runs

    ids = [r.run_id for r in spec.runs] if spec is not None else None
    path = store.export_csv(args.csv, ids)
    n = len(load_runs(path))
    emit(args, {"csv": str(path), "runs": n}, lambda o: f"wrote {o['runs']} runs to {o['csv']}")
    return 0
