"""Exports of a trained model to other ecosystems (Hugging Face transformers)."""
