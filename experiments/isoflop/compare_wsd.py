"""WSD runs (and cooldown branches) against the mini grid's cosine runs of the same size, G and D,
and against the same cosine runs with twice the peak LR (lr_check.csv).

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
    lr2 = HERE / "lr_check.csv"
    if lr2.is_file():
        fast = load_runs(lr2)
        fast = fast[fast.status == "done"]
        print("\n| run | D | cosine, lr 1e-3 (mini) | cosine, lr 2e-3 | WSD, lr 1e-3 |")
        print("|---|---|---|---|---|")
        for r in fast.itertuples():
            same = [_match(t, r, key) for t in (cos, wsd)]
            if any(m is None for m in same):
                continue
            kind = "dense" if r.ffn == "dense" else f"G={int(r.granularity)}"
            print(
                f"| {int(r.d_model)}x{int(r.n_blocks)} {kind} | {r.tokens / 1e6:.2f}M | "
                f"{same[0].val_loss:.4f} | {r.val_loss:.4f} | {same[1].val_loss:.4f} |"
            )
    return 0


def _match(table, row, key):
    for k in key:
        table = table[table[k] == getattr(row, k)]
    return None if table.empty else table.iloc[0]


if __name__ == "__main__":
    sys.exit(main())
