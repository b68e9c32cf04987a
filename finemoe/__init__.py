"""finemoe: fine-grained Mixture-of-Experts language models and their scaling laws (arXiv 2402.07871)."""

__version__ = "0.1.0"
