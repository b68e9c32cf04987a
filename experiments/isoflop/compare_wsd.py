"""WSD runs (and cooldown branches) against the mini grid's cosine runs of the same size, G and D,
and each schedule over a grid of peak LRs at 1M tokens (lr_check.csv, lr_grid_*.csv).

    python experiments/isoflop/compare_wsd.py      # reads wsd_check.csv, lr_check.csv, ../mini/results.csv

Prints Markdown tables; the check is |WSD - cosine| <= 0.02 nats in validation loss.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from finemoe.sweep.store import load_runs  # noqa: E402

TOLERANCE = 0.02


def main() -> int:
    wsd, cos = load_runs(HERE / "wsd_check.csv"), load_runs(HERE.parent / "mini" / "results.csv")
    wsd, cos = wsd[wsd.status == "done"], cos[cos.status == "done"]
    key = ["d_model", "n_blocks", "ffn", "granularity", "tokens"]
    rows, saved, trained = [], 0, 0
    for r in wsd.itertuples():
        match = cos
        for k in key:
            match = match[match[k] == getattr(r, k)]
        if match.empty:
            continue
        c = match.iloc[0]
        record = json.loads(r.record) if isinstance(r.record, str) else {}
        skipped = (
            int(record.get("branched_at") or 0)
            * int(record.get("batch_size", 0))
            * int(record.get("seq_len", 0))
        )
        saved, trained = saved + skipped, trained + int(r.tokens)
        kind = "dense" if r.ffn == "dense" else f"G={int(r.granularity)}"
        dv = r.val_loss - c.val_loss
        rows.append(
            f"| {int(r.d_model)}x{int(r.n_blocks)} {kind} | {r.tokens / 1e6:.2f}M | "
            f"{'branch' if skipped else 'stable'} | {r.val_loss:.4f} | {c.val_loss:.4f} | {dv:+.4f} | "
            f"{r.train_loss:.4f} | {c.train_loss:.4f} | {'yes' if abs(dv) <= TOLERANCE else 'NO'} |"
        )
    print(
        "| run | D | WSD run | WSD val | cosine val | WSD - cosine | WSD train | cosine train | within 0.02 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nbranches started from snapshots: {saved / 1e6:.2f}M of {trained / 1e6:.2f}M tokens not trained "
        "again"
    )
    lr_grid(key)
    return 0


def lr_grid(key) -> None:
    """Each schedule at each peak LR tried (1M tokens), and the two at their best LR: Hagele et al.
    compare WSD with cosine at tuned LRs, so the check is best against best."""
    mini = load_runs(HERE.parent / "mini" / "results.csv")
    tables = [("cosine", 1e-3, mini[mini.tokens == 999424])]
    for f in sorted(HERE.glob("lr_grid_*.csv")) + [HERE / "lr_check.csv", HERE / "wsd_check.csv"]:
        if not f.is_file():
            continue
        df = load_runs(f)
        for r in df.itertuples():
            cfg = json.loads(r.config) if isinstance(r.config, str) else {}
            tables.append((r.schedule, float(cfg.get("lr", 0)), df[df.run_id == r.run_id]))
    grid: dict[tuple, dict[tuple, float]] = {}
    for schedule, lr, df in tables:
        for r in df[df.status == "done"].itertuples():
            if int(r.tokens) != 999424 or int(r.d_model) != 128 or int(r.n_blocks) != 2:
                continue
            kind = "dense" if r.ffn == "dense" else f"G={int(r.granularity)}"
            grid.setdefault(kind, {})[(schedule, lr)] = float(r.val_loss)
    grid = {k: row for k, row in grid.items() if {s for s, _ in row} == {"cosine", "wsd"}}
    cols = sorted({c for row in grid.values() for c in row})
    print(
        "\n| 128x2, 1M tokens | " + " | ".join(f"{s} {lr:g}" for s, lr in cols) + " | best cosine | best WSD "
        "| WSD - cosine | within 0.02 | best LR at the grid's edge |"
    )
    print("|---" * (len(cols) + 6) + "|")
    for kind, row in sorted(grid.items()):
        best = {}
        for sched in ("cosine", "wsd"):
            mine = {lr: v for (s, lr), v in row.items() if s == sched}
            lr = min(mine, key=mine.get)
            best[sched] = (mine[lr], lr, lr == max(mine))
        d = best["wsd"][0] - best["cosine"][0]
        edge = [s for s in best if best[s][2]]
        print(
            f"| {kind} | "
            + " | ".join(f"{row[c]:.4f}" if c in row else "" for c in cols)
            + " | ".join(["", *(f"{best[k][0]:.4f} (lr {best[k][1]:g})" for k in ("cosine", "wsd")), ""])
            + f"{d:+.4f} | {'yes' if abs(d) <= TOLERANCE else 'NO'} | {', '.join(edge) or 'none'} |"
        )


def _match(table, row, key):
    for k in key:
        table = table[table[k] == getattr(row, k)]
    return None if table.empty else table.iloc[0]


if __name__ == "__main__":
    sys.exit(main())
