"""A torchrun worker for test_ddp: train, then report the threads the process still runs
(to threads-<rank>.json in the folder given, as the ranks share one stdout).

After train() has torn the process group down, no gloo thread may be left: one that outlives the
interpreter can abort the process at exit (see finemoe.train.distributed).
"""

import json
import os
import sys
from pathlib import Path

import yaml

from finemoe.train.config import TrainConfig
from finemoe.train.trainer import train


def thread_names() -> list[str]:
    return sorted((task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())


if __name__ == "__main__":
    config, report_dir = sys.argv[1:3]
    with open(config) as f:
        train(TrainConfig.from_dict(yaml.safe_load(f)), quiet=True)
    rank = int(os.environ["RANK"])
    (Path(report_dir) / f"threads-{rank}.json").write_text(
        json.dumps({"rank": rank, "threads": thread_names()})
    )
