"""Batch-independent Expert Choice inference against batch routing, on a trained model.

    python experiments/ec_inference/measure.py MODEL_DIR [--data data/default] [--calibrate 64]

Validation loss on the trainer's fixed validation batches (seed 0, batch 16 x seq_len), routed four
ways: by groups across the batch as in training, at batch 16 and at batch 8; by calibrated thresholds
(each sequence on its own), at batch 16 and one sequence at a time. Also how far one sequence's logits
move when only its batch-mates change. With --calibrate N the thresholds are (re)set from N training
batches of 16 first (a model trained before thresholds existed has none).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finemoe.api import load  # noqa: E402
from finemoe.data.tokens import TokenFile  # noqa: E402
from finemoe.nn.moe import batch_routing, calibrate  # noqa: E402


def val_loss(model, val: TokenFile, seq: int, batch: int, n_seqs: int) -> float:
    total, count = 0.0, 0
    for i in range(n_seqs // batch):
        x, y = val.batch(i, batch, seq, 0)
        total += model(torch.from_numpy(x), torch.from_numpy(y)).loss.item() * batch
        count += batch
    return total / count


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--data", default="data/default")
    p.add_argument("--calibrate", type=int, default=0, help="training batches of 16 to calibrate on first")
    p.add_argument("--sequences", type=int, default=256, help="validation sequences (16 batches of 16)")
    a = p.parse_args()
    torch.manual_seed(0)
    model = load(a.model)
    seq = model.cfg.seq_len
    train, val = TokenFile(Path(a.data) / "train.bin"), TokenFile(Path(a.data) / "val.bin")
    if a.calibrate:
        calibrate(model, (torch.from_numpy(train.batch(i, 16, seq, 0)[0]) for i in range(a.calibrate)))
    model.eval()
    rows = []
    with batch_routing(model):
        rows += [
            ("batch routing (training's groups), batch 16", val_loss(model, val, seq, 16, a.sequences)),
            ("batch routing (training's groups), batch 8", val_loss(model, val, seq, 8, a.sequences)),
        ]
    rows += [
        ("thresholds (each sequence alone), batch 16", val_loss(model, val, seq, 16, a.sequences)),
        ("thresholds (each sequence alone), batch 1", val_loss(model, val, seq, 1, a.sequences)),
    ]
    one = torch.from_numpy(val.batch(0, 1, seq, 0)[0])
    mates = [torch.from_numpy(val.batch(i, 15, seq, 1)[0]) for i in (1, 2)]
    moved = {}
    for name, on in (("batch routing", True), ("thresholds", False)):
        with batch_routing(model, on):
            a_, b_ = (model(torch.cat([one, m])).logits[0] for m in mates)
        moved[name] = (a_ - b_).abs().max().item()
    print(
        f"model {a.model}; {a.sequences} validation sequences of {seq} tokens"
        + (f"; thresholds from {a.calibrate} training batches of 16" if a.calibrate else "")
    )
    print("| routing | validation loss |\n|---|---|")
    for name, loss in rows:
        print(f"| {name} | {loss:.4f} |")
    print(f"\nthresholds - batch routing at batch 16: {rows[2][1] - rows[0][1]:+.4f} nats")
    for name, v in moved.items():
        print(f"largest change of one sequence's logits when only its 15 batch-mates change, {name}: {v:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
