"""The public Python API: what the CLI does, as functions over the same library (the CLI only parses,
calls these modules and prints).

    import finemoe
    p = finemoe.plan(1e20)                                   # the dict `finemoe plan --json` prints
    res = finemoe.fit("experiments/mini/results.csv")        # a FitResult; res.to_dict() is `fit --json`
    df = finemoe.results("runs/mini/results.sqlite")         # the runs as a pandas DataFrame
    model = finemoe.load("runs/tiny")                        # a run folder or a model folder, in eval mode
    text = finemoe.generate("runs/tiny/model", "Once upon")  # its continuation (a list for a list)
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


def generate(
    model_or_dir,
    prompts: str | list[str],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer=None,
    device: str = "cpu",
    stop_at_eos: bool = True,
) -> str | list[str]:
    """The continuation of each prompt, as `finemoe generate` samples it: a string for a string, a list
    for a list. `model_or_dir` is a model folder, a run folder or a checkpoint (loaded with its
    tokenizer), or a loaded model, which needs `tokenizer` (a tokenizer.json path or a Tokenizer).

    The prompts decode together through a KV cache; each gets the tokens it would get alone, prompt i
    sampling with seed + i. Temperature 0 is greedy; top_k and top_p (nucleus) filter the sampling.
    A continuation ends at <|endoftext|> when the tokenizer has it (unless stop_at_eos=False). See
    finemoe.train.generate.generate_ids for the context past seq_len and uncalibrated Expert Choice."""
    from finemoe.errors import ConfigError
    from finemoe.train.generate import (
        check_sampling,
        find_tokenizer,
        generate_text,
        load_tokenizer,
        training_config,
    )

    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ConfigError("no prompts given; pass a string or a list of strings")
    if isinstance(model_or_dir, (str, Path)):
        model = load(model_or_dir, device)
        if tokenizer is None:
            tokenizer = find_tokenizer(model_or_dir, training_config(model_or_dir))
    elif tokenizer is None:
        raise ConfigError("a loaded model needs tokenizer= (a tokenizer.json path or a Tokenizer)")
    else:
        model = model_or_dir
    results = generate_text(
        model, load_tokenizer(tokenizer), texts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos
    )
    out = [r["completion"] for r in results]
    return out[0] if isinstance(prompts, str) else out


def train(config: str | Path | dict, resume: bool = False, quiet: bool = True, **overrides: Any) -> dict:
    """See finemoe.train.entry.train."""
    from finemoe.train.entry import train as run

    return run(config, resume=resume, quiet=quiet, **overrides)
