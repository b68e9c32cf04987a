"""`finemoe quickstart`: corpus, a small sweep, fits, plan and report, end to end; re-running reuses work."""

from __future__ import annotations

import argparse
import time

from finemoe.commands.common import add_json_flag, emit, positive_float, positive_int

PAPER_C = 0.47  # the paper's irreducible loss; a ten-minute sweep cannot identify c, so it is fixed


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="prepare the corpus, run the quickstart sweep, fit, plan, report")
    p.add_argument("--spec", default="quickstart", help="sweep spec (default: the built-in 'quickstart')")
    p.add_argument("--out", help="report folder (default: <runs_dir>/report)")
    p.add_argument("--workers", type=positive_int, help="local worker processes (default 1)")
    p.add_argument("--threads", type=positive_int, help="torch threads per run (default: cores / workers)")
    p.add_argument(
        "--fix-c",
        type=positive_float,
        default=PAPER_C,
        help=f"irreducible loss c for Eq. 9/1 (default {PAPER_C})",
    )
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap refits (default 50)")
    add_json_flag(p)
    p.set_defaults(func=run)


def prepare_data(data_dir: str, log, vocab_size: int = 8192) -> None:
    """Build the default corpus with a `vocab_size` BPE, unless data_dir holds tokens prepared some other
    way; the builder itself reuses a folder built by the same request."""
    from pathlib import Path

    from finemoe.errors import DataError

    d = Path(data_dir)
    if (d / "train.bin").is_file() and not (d / "meta.json").is_file():
        return  # tokens the user prepared some other way: use them as they are
    try:
        from finemoe.data.prepare import prepare
    except ImportError:
        if (d / "train.bin").is_file():
            return
        raise DataError(
            f"{d} has no train.bin and this build has no corpus builder; prepare text with "
            "`finemoe data prepare --out DIR` or set data_dir in the spec"
        ) from None
    prepare(out=d, vocab_size=vocab_size, log=log)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from finemoe.errors import ConfigError
    from finemoe.io import check_folder_path
    from finemoe.report.report import ReportOptions, build_report
    from finemoe.sweep import spec as specmod
    from finemoe.sweep.driver import run_sweep

    log = (lambda *_: None) if args.json else (lambda *a: print(*a, flush=True))
    t0 = time.time()
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    spec = specmod.load(args.spec)
    check_folder_path(Path(args.out) if args.out else Path(spec.runs_dir) / "report", "report folder")

    log(f"[1/3] corpus and tokenizer -> {spec.data_dir}")
    prepare_data(spec.data_dir, log, vocab_size=spec.runs[0].config["model"]["vocab_size"])
    log(f"      ({time.time() - t0:.0f} s)")

    log(f"[2/3] sweep '{spec.name}': {len(spec.runs)} runs (finished ones are reused)")
    counts = run_sweep(spec, options={"workers": args.workers, "threads": args.threads}, log=log)
    log(f"      ({time.time() - t0:.0f} s)")

    log("[3/3] fits (Eq. 4 per (N, D); Eq. 9 and Eq. 1 with c fixed), plan and report")
    out = Path(args.out) if args.out else Path(spec.runs_dir) / "report"
    opts = ReportOptions(
        fix_c=args.fix_c,
        bootstrap=args.bootstrap,
        budgets=(1e15, 1e17, 1e19, 1e21),
        title=f"finemoe quickstart ({spec.name})",
        notes=[
            f"A {len(spec.runs)}-run sweep of tiny models: it shows the pipeline, not the paper's "
            f"numbers. c is fixed at {args.fix_c} because so few runs cannot identify it.",
            "For the real experiment see experiments/mini/.",
        ],
    )
    rep = build_report(spec.store, out, opts)
    coeffs = rep.coefficients
    result = {
        "report": str(rep.path),
        "store": spec.store,
        "coefficients": str(coeffs) if coeffs else None,
        "flags": rep.flags,
        "degenerate": rep.degenerate,
        "seconds": round(time.time() - t0, 1),
        **{k: counts[k] for k in ("done", "diverged", "failed", "to_run")},
    }

    def human(o):
        lines = [
            f"done in {o['seconds']:.0f} s: {o['done']} runs done, {o['diverged']} diverged, {o['failed']} "
            "failed",
            f"report:  {o['report']}",
            f"results: {o['store']}  (finemoe sweep status {args.spec})",
        ]
        for law, why in o["flags"].items():
            if why:
                lines.append(f"the {law} fit is degenerate ({'; '.join(why)})")
        if o["coefficients"] and not o["degenerate"]:
            lines.append(
                f"plan with the fitted law: finemoe plan --flops 1e18 --coefficients {o['coefficients']}"
            )
        elif o["coefficients"]:
            lines.append(
                "these runs do not identify the law, so no plan is recommended from it: plan with the "
                "paper's coefficients (finemoe plan --flops 1e18), or run a larger sweep "
                "(experiments/isoflop)"
            )
        return "\n".join(lines)

    emit(args, result, human)
    return 0 if counts["failed"] == 0 else 1
