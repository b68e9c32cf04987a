"""finemoe: fine-grained Mixture-of-Experts language models and their scaling laws (arXiv 2402.07871).

The public API (finemoe.api, docs/api.md): `plan`, `fit`, `results`, `load`, `train`, `generate`. They import
their dependencies (torch, scipy, pandas) when first called, so `import finemoe` stays light.
"""

__version__ = "0.1.0"
__all__ = ["plan", "fit", "results", "load", "train", "generate", "__version__"]


def __getattr__(name: str):
    if name == "train":  # the subpackage, callable as finemoe.api.train (see finemoe/train/__init__.py)
        import finemoe.train

        return finemoe.train
    if name in ("plan", "fit", "results", "load", "generate"):
        from finemoe import api

        return getattr(api, name)
    raise AttributeError(f"module 'finemoe' has no attribute {name!r}")
