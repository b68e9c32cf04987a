"""The public Python API: what the CLI does, as functions over the same library (the CLI only parses,
calls these modules and prints).

    import finemoe
    p = finemoe.plan(1e20)                                   # the dict `finemoe plan --json` prints
    res = finemoe.fit("experiments/mini/results.csv")        # a FitResult; res.to_dict() is `fit --json`
    df = finemoe.results("runs/mini/results.sqlite")         # the runs as a pandas DataFrame
    model = finemoe.load("runs/tiny")                        # a run folder or a model folder, in eval mode
    record = finemoe.train("configs/tiny.yaml", tokens=1e6)  # trains, returns the final record
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plan(
    flops: float, coefficients: str = "paper", expansion_rate: float | None = None, **settings: Any
) -> dict:
    """The compute-optimal MoE for a budget: the same dict as `finemoe plan --flops F --json`.

    `coefficients` is a published set's name or a `fit --out` file; `settings` are
    finemoe.scaling.plan.Settings fields (granularities, max_total_params, c_r, ...)."""
    from finemoe.scaling.budget import budget_plan
    from finemoe.scaling.laws import load_coefficients
    from finemoe.scaling.plan import Settings

    coeffs = load_coefficients(coefficients)
    s = Settings(expansion_rate=expansion_rate or coeffs.expansion_rate, **settings)
    return budget_plan(coeffs, float(flops), s)[0]


def results(path: str | Path):
    """The runs of a results store (.sqlite) or of its CSV export, as a pandas DataFrame."""
    from finemoe.sweep.store import load_runs

    return load_runs(path, require_status=False)


def fit(
    results_or_dataframe,
    law: str = "moe",
    *,
    loss_column: str = "train_loss",
    fixed: dict[str, float] | None = None,
    prior: str | None = None,
    holdout: float | None = 0.2,
    bootstrap: int = 0,
    seed: int = 0,
):
    """Fit Eq. 9 (moe), Eq. 1 (dense) or Eq. 4 (granularity) to finished runs: a path (store or CSV), a
    list of paths, or a DataFrame with the store's columns. Returns a finemoe.scaling.fit.FitResult."""
    import pandas as pd

    from finemoe.scaling.fit import fit as fit_law
    from finemoe.scaling.laws import prior_exponents
    from finemoe.scaling.runs import points_from_rows

    if isinstance(results_or_dataframe, pd.DataFrame):
        rows = results_or_dataframe.to_dict("records")
        pts = points_from_rows(rows, law, loss_column, "the DataFrame")
    else:
        from finemoe.scaling.runs import load_points

        pts = load_points(results_or_dataframe, law, loss_column)
    if law == "granularity" and (prior or fixed or bootstrap):
        from finemoe.errors import ConfigError

        raise ConfigError(
            "prior, fixed and bootstrap apply to the moe and dense laws, not to law='granularity'"
        )
    held = {**(prior_exponents(prior, law) if prior else {}), **(fixed or {})}
    return fit_law(
        pts,
        law,
        fixed=held or None,
        holdout=holdout if law != "granularity" else None,
        bootstrap=bootstrap,
        seed=seed,
    )


def load(run_or_model_dir: str | Path, device: str = "cpu"):
    """A trained model in eval mode, from a model folder (config.json + model.safetensors), a run folder
    (its model/ after training, else its last checkpoint), or a checkpoint file."""
    from finemoe.nn.model import load_pretrained
    from finemoe.train.generate import load_model

    path = Path(run_or_model_dir)
    for folder in (path, path / "model"):
        if (folder / "model.safetensors").is_file():
            return load_pretrained(folder, map_location=device).to(device).eval()
    return load_model(path, device)[0]


def train(config: str | Path | dict, resume: bool = False, quiet: bool = True, **overrides: Any) -> dict:
    """See finemoe.train.entry.train."""
    from finemoe.train.entry import train as run

    return run(config, resume=resume, quiet=quiet, **overrides)
