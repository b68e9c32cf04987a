"""Sweeps over (N, D, G): a YAML spec expands into training runs recorded in a SQLite store."""
