"""Figures and the Markdown report assembled from a results store."""
